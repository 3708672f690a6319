"""The fairness task's data types and its seeded, stratified split.

A :class:`FairExample` is one text (or text pair) with a class label and one or more protected
attributes (``groups``: attribute -> value, binary or multi-valued). A :class:`FairTable` is a
list of examples with their label names, as a loader returns it; :func:`split_dataset` turns it
into a :class:`FairDataset` (train / val / test plus counts and how it was built).

The split is stratified by label x first attribute (or any key), exact per stratum (largest
remainder), seeded, and independent of the input order: units are sorted by a content hash
before a seeded shuffle. Examples with the same text (and text pair) form one unit, so a text
never appears in two splits.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from excise.config import validate
from excise.errors import ExciseError

SPLITS = ("train", "val", "test")


def text_key(text: str, text_pair: str | None) -> str:
    """Content hash of a text (and its pair): the unit the split keeps together."""
    raw = text if text_pair is None else f"{text}\x1f{text_pair}"
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class FairExample:
    """One example: ``text`` (and ``text_pair`` for query/document or resume/job matching), the
    class ``label`` (an index into the dataset's ``label_names``), its protected attributes
    ``groups`` (attribute -> value), and where it came from (``source``: ``file:line``).

    ``id`` is a content hash (text, pair, label, groups), stable across runs and machines; it is
    filled in when not given. ``extra`` keeps source columns that are not part of the task
    (BUG's profession, pronoun and corpus) for analysis; it is not part of the id.
    """

    text: str
    label: int
    groups: Mapping[str, str]
    text_pair: str | None = None
    source: str = ""
    id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            g = "\x1e".join(f"{k}={v}" for k, v in sorted(self.groups.items()))
            raw = f"{self.text}\x1f{self.text_pair}\x1f{self.label}\x1f{g}"
            object.__setattr__(self, "id", hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16])

    def __hash__(self) -> int:  # groups is a dict: hash by the content id
        return hash(self.id)

    @property
    def unit(self) -> str:
        """The split unit: examples with the same text (and pair) always share a split."""
        return text_key(self.text, self.text_pair)

    def with_(self, **changes: Any) -> "FairExample":
        """A copy with some fields changed; the id is recomputed unless given."""
        changes.setdefault("id", "")
        return replace(self, **changes)


@dataclass
class FairTable:
    """Examples as loaded, before splitting: ``label_names[i]`` names label ``i``; ``attributes``
    are the protected attributes in order (the first one stratifies the split by default)."""

    examples: list[FairExample]
    label_names: tuple[str, ...]
    attributes: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
              stratify: Callable[[FairExample], Hashable] | None = None) -> "FairDataset":
        return split_dataset(self, fractions=fractions, seed=seed, stratify=stratify)


@dataclass
class FairDataset:
    """Train / validation / test examples of one classification task with protected attributes.

    ``meta["counts"][split]`` holds ``n`` and, per label name, ``n`` and the count of every value of
    every attribute; ``meta["split"]`` how the split was made; loaders add ``meta["built"]``.
    """

    train: list[FairExample]
    val: list[FairExample]
    test: list[FairExample]
    label_names: tuple[str, ...]
    attributes: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, list[FairExample]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def __iter__(self) -> Iterator[FairExample]:
        for s in SPLITS:
            yield from getattr(self, s)

    def __len__(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)

    def group_values(self, attribute: str) -> list[str]:
        """The sorted values ``attribute`` takes anywhere in the data."""
        return sorted({ex.groups[attribute] for ex in self if attribute in ex.groups})

    def counts(self) -> dict[str, Any]:
        return count_examples(self.splits, self.label_names, self.attributes)


def count_examples(splits: Mapping[str, Sequence[FairExample]], label_names: Sequence[str],
                   attributes: Sequence[str]) -> dict[str, Any]:
    """``{split: {"n": n, "labels": {label_name: {"n": n, attribute: {value: n}}}}}``."""
    out: dict[str, Any] = {}
    for name, exs in splits.items():
        labels: dict[str, Any] = {}
        for ex in exs:
            ln = label_names[ex.label] if 0 <= ex.label < len(label_names) else str(ex.label)
            cell = labels.setdefault(ln, {"n": 0, **{a: {} for a in attributes}})
            cell["n"] += 1
            for a in attributes:
                v = ex.groups.get(a)
                if v is not None:
                    cell[a][v] = cell[a].get(v, 0) + 1
        ordered = {ln: labels[ln] for ln in label_names if ln in labels}
        ordered.update({k: v for k, v in labels.items() if k not in ordered})
        for cell in ordered.values():
            for a in attributes:
                cell[a] = dict(sorted(cell[a].items()))
        out[name] = {"n": len(exs), "labels": ordered}
    return out


class SplitConfig(BaseModel):
    """How :func:`split_dataset` splits (defaults: 60 / 20 / 20, seed 0)."""

    model_config = ConfigDict(extra="forbid")
    fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train, validation and test shares; non-negative, sum to 1, train > 0")
    seed: int = Field(0, description="seeds the shuffle inside each stratum")

    @field_validator("fractions")
    @classmethod
    def _check(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not math.isfinite(f) or f < 0 for f in v) or v[0] <= 0:
            raise ValueError("fractions must be finite and >= 0, with train > 0")
        if abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {sum(v):g}")
        return v


def _allocate(n: int, fractions: Sequence[float], rng: random.Random) -> list[int]:
    """Split ``n`` into integer parts proportional to ``fractions`` (largest remainder; ties, as
    between equal validation and test shares, broken by ``rng`` so neither side always wins)."""
    raw = [n * f for f in fractions]
    parts = [math.floor(r) for r in raw]
    tie = list(range(len(raw)))
    rng.shuffle(tie)
    order = sorted(range(len(raw)), key=lambda i: (-round(raw[i] - parts[i], 9), tie[i]))
    for i in order[: n - sum(parts)]:
        parts[i] += 1
    return parts


def default_stratify(attributes: Sequence[str]) -> Callable[[FairExample], Hashable]:
    """Stratum = (label, value of the first attribute)."""
    first = attributes[0] if attributes else None
    return lambda ex: (ex.label, ex.groups.get(first, "") if first else "")


def split_dataset(examples: Sequence[FairExample] | FairTable, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                  seed: int = 0, *, stratify: Callable[[FairExample], Hashable] | None = None,
                  label_names: Sequence[str] | None = None, attributes: Sequence[str] | None = None,
                  meta: Mapping[str, Any] | None = None) -> FairDataset:
    """Seeded train / val / test split, stratified by label x first attribute (or ``stratify``).

    Deterministic for a given seed whatever the input order: examples sharing a text (and pair)
    form one unit; units are grouped by the stratum of their first example (by id), sorted by
    content hash, shuffled with ``random.Random(f"{seed}:{stratum}")``, and cut with exact
    per-stratum counts (largest remainder). Each split comes back sorted by ``id``.
    """
    cfg = validate(SplitConfig, {"fractions": tuple(fractions), "seed": seed}, source="split_dataset")
    if isinstance(examples, FairTable):
        table = examples
        exs = list(table.examples)
        label_names = tuple(label_names or table.label_names)
        attributes = tuple(attributes or table.attributes)
        meta = {**table.meta, **(meta or {})}
    else:
        exs = list(examples)
        if label_names is None:
            label_names = tuple(str(i) for i in range(max((e.label for e in exs), default=-1) + 1))
        if attributes is None:
            attributes = tuple(dict.fromkeys(a for e in exs for a in e.groups))
    label_names, attributes = tuple(label_names), tuple(attributes)
    if not exs:
        raise ExciseError("no examples to split")
    key = stratify or default_stratify(attributes)
    units: dict[str, list[FairExample]] = defaultdict(list)
    for ex in exs:
        units[ex.unit].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for u, members in units.items():
        members.sort(key=lambda e: e.id)
        strata[repr(key(members[0]))].append(u)
    out: dict[str, list[FairExample]] = {s: [] for s in SPLITS}
    for stratum in sorted(strata):
        us = sorted(strata[stratum])
        rng = random.Random(f"{cfg.seed}:{stratum}")
        rng.shuffle(us)
        start = 0
        for name, k in zip(SPLITS, _allocate(len(us), cfg.fractions, rng)):
            for u in us[start:start + k]:
                out[name] += units[u]
            start += k
    for name in SPLITS:
        out[name].sort(key=lambda e: (e.id, e.source))
    m = dict(meta or {})
    m["split"] = {"fractions": list(cfg.fractions), "seed": cfg.seed, "strata": len(strata), "units": len(units),
                  "stratify": "label x " + attributes[0] if (stratify is None and attributes) else
                  ("label" if stratify is None else getattr(stratify, "__doc__", None) or "custom")}
    m["counts"] = count_examples(out, label_names, attributes)
    return FairDataset(train=out["train"], val=out["val"], test=out["test"], label_names=label_names,
                       attributes=attributes, meta=m)
