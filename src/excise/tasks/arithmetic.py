"""Arithmetic task for robust unlearning (the UNDO setting, arXiv 2506.06278).

Items are equations (``12 * 7 = 84``) and templated word problems for + - * /. Addition and
subtraction draw operands from 1-50 (subtraction keeps a >= b so answers are non-negative);
multiplication and division draw operands from 1-20 and division is exact
(``(a*b) / b = a``). forget = multiplication and division, retain = addition and subtraction.

Why the split is by *string*: the skill to forget is the memorised operation, so every fact
recurs in many surface forms; a stable hash of its prompt puts every string in exactly one pool,
and training samples are drawn only from the ``train`` strings. Held-out strings are therefore
never seen in training, while the facts they ask about are. The held-out 10% is cut into three
pools, disjoint by construction (DESIGN: three disjoint pools): ``dev`` tunes hyperparameters
(and the organism's pretraining probe), ``check`` drives early stopping (distillation), ``test``
is what results are reported on (final accuracy, relearning curves).

The small decoder that learns this mix (its word/digit-level tokenizer, architecture and
pretraining) is a model organism: :mod:`excise.organisms.arithmetic`.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from excise.errors import ExciseError, where
from excise.io import iter_jsonl

OPS = ("add", "sub", "mul", "div")
FORGET_OPS = ("mul", "div")
RETAIN_OPS = ("add", "sub")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
RANGES = {"add": (1, 50), "sub": (1, 50), "mul": (1, 20), "div": (1, 20)}

NAMES = ("tom", "ana", "lee", "sam", "mia", "ben", "eva", "max", "zoe", "kai", "ivy", "leo")
OBJECTS = ("apples", "pens", "coins", "books", "cards", "shells", "cups", "stones")
# {a} {b} are the operands as written; {n} a name, {o} an object
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("what is {a} plus {b}? ", "{n} has {a} {o} and gets {b} more. how many {o} now? "),
    "sub": ("what is {a} minus {b}? ", "{n} has {a} {o} and gives away {b}. how many {o} left? "),
    "mul": ("what is {a} times {b}? ", "{n} has {a} bags of {b} {o}. how many {o} in all? "),
    "div": ("what is {a} divided by {b}? ", "{n} splits {a} {o} into {b} equal piles. how many {o} per pile? "),
}
EVAL_FRACTION = 0.1  # share of prompt strings held out of training (by stable hash)
# held-out pools: ranges of crc32(prompt) % 1000 inside [0, 1000 * EVAL_FRACTION); the rest is train
POOLS: dict[str, tuple[int, int]] = {"test": (0, 50), "dev": (50, 75), "check": (75, 100)}
Pool = Literal["train", "test", "dev", "check"]


@dataclass(frozen=True)
class Item:
    """One question: ``prompt`` ends right before the answer; ``text`` is what a model trains on."""

    prompt: str
    answer: int
    op: str
    kind: str = "equation"  # equation | question | word

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}."

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "op": self.op, "kind": self.kind}


def facts(op: str) -> list[tuple[int, int, int]]:
    """All (a, b, answer) facts of one operation."""
    lo, hi = RANGES[op]
    out = []
    for x in range(lo, hi + 1):
        for y in range(lo, hi + 1):
            if op == "add":
                out.append((x, y, x + y))
            elif op == "sub":
                if x >= y:
                    out.append((x, y, x - y))
            elif op == "mul":
                out.append((x, y, x * y))
            else:  # exact division: (x*y) / y = x
                out.append((x * y, y, x))
    return out


_FACTS: dict[str, list[tuple[int, int, int]]] = {}


def _facts(op: str) -> list[tuple[int, int, int]]:
    if op not in _FACTS:
        _FACTS[op] = facts(op)
    return _FACTS[op]


def pool_of(prompt: str) -> str:
    """The one pool a prompt string belongs to (crc32, not Python's salted hash): train, test, dev or check."""
    h = zlib.crc32(prompt.encode("utf-8")) % 1000
    return next((name for name, (lo, hi) in POOLS.items() if lo <= h < hi), "train")


def is_eval_string(prompt: str) -> bool:
    """Whether a prompt string is held out of training (any of the test, dev and check pools)."""
    return pool_of(prompt) != "train"


def _check_pool(pool: str) -> None:
    if pool != "train" and pool not in POOLS:
        raise ExciseError(f"unknown item pool '{pool}'; choose train, {', '.join(POOLS)}")


def render(op: str, a: int, b: int, kind: str, rng: random.Random) -> str:
    if kind == "equation":
        return f"{a} {SYMBOL[op]} {b} = "
    tpl = TEMPLATES[op][0 if kind == "question" else 1]
    return tpl.format(a=a, b=b, n=rng.choice(NAMES), o=rng.choice(OBJECTS))


KIND_WEIGHTS = (("equation", 0.5), ("question", 0.25), ("word", 0.25))


def sample_item(op: str, rng: random.Random, split: str) -> Item:
    """Draw one item of ``op`` whose prompt string belongs to pool ``split`` (train, test, dev or check)."""
    if op not in OPS:
        raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}")
    _check_pool(split)
    kinds, weights = zip(*KIND_WEIGHTS)
    for _ in range(10_000):
        a, b, c = rng.choice(_facts(op))
        kind = rng.choices(kinds, weights)[0]
        prompt = render(op, a, b, kind, rng)
        if pool_of(prompt) == split:
            return Item(prompt, c, op, kind)
    raise RuntimeError("could not draw an item from the requested split")  # pragma: no cover


def eval_items(ops: Sequence[str], n_per_op: int, seed: int = 0, pool: str = "test") -> list[Item]:
    """A fixed held-out set: ``n_per_op`` distinct prompts per operation from one pool (default: test)."""
    _check_pool(pool)
    if pool == "train":
        raise ExciseError("held-out items come from the test, dev or check pool, not train")
    rng = random.Random(f"eval-{seed}" if pool == "test" else f"{pool}-{seed}")
    out: list[Item] = []
    for op in ops:
        seen: set[str] = set()
        while len(seen) < n_per_op:
            it = sample_item(op, rng, pool)
            if it.prompt not in seen:
                seen.add(it.prompt)
                out.append(it)
    return out


def train_stream(ops: Sequence[str], seed: int) -> Iterator[Item]:
    """An endless seeded stream of training items, operations drawn uniformly."""
    if not ops:
        raise ExciseError("a training stream needs at least one operation")
    for op in ops:
        if op not in OPS:
            raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}")
    rng = random.Random(f"train-{seed}")
    ops = list(ops)
    while True:
        yield sample_item(rng.choice(ops), rng, "train")


def train_items(ops: Sequence[str], n: int, seed: int) -> list[Item]:
    it = train_stream(ops, seed)
    return [next(it) for _ in range(n)]


# --- user data files ----------------------------------------------------------------------

def load_items(path: str | Path, *, required_ops: Sequence[str] | None = None,
               group: Literal["forget", "retain"] | None = None) -> list[Item]:
    """Read JSONL rows ``{"prompt": str, "answer": int, "op": str (optional)}``.

    Every bad row fails with ``file:line:field``. ``op`` defaults to ``"custom"``; when
    ``required_ops`` is given every row's op must be one of them. ``group`` checks the rows as
    given: a forget file must hold no retain operation and a retain file no forget operation
    (why: forget-only attacks and forget losses must never see the retain set).
    """
    other = {"forget": RETAIN_OPS, "retain": FORGET_OPS}.get(group or "", ())
    path = Path(path)
    items: list[Item] = []
    for i, row in iter_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ExciseError("missing or empty string", where=where(path, i, "prompt"))
        ans = row.get("answer")
        if isinstance(ans, bool) or not isinstance(ans, (int, str)) or not str(ans).lstrip("-").isdigit():
            raise ExciseError("answer must be an integer", where=where(path, i, "answer"))
        op = row.get("op", "custom")
        if not isinstance(op, str):
            raise ExciseError("op must be a string", where=where(path, i, "op"))
        if required_ops is not None and op not in required_ops:
            raise ExciseError(f"op '{op}' not allowed here; expected one of {', '.join(required_ops)}", where=where(path, i, "op"))
        if op in other:
            kind = "retain" if group == "forget" else "forget"
            raise ExciseError(f"op '{op}' is a {kind} operation; a {group} file must hold only {group} rows",
                              where=where(path, i, "op"))
        unknown = set(row) - {"prompt", "answer", "op", "kind"}
        if unknown:
            raise ExciseError("unknown field", where=where(path, i, sorted(unknown)[0]))
        items.append(Item(prompt, int(ans), op, str(row.get("kind", "custom"))))
    if not items:
        raise ExciseError("no items in file", where=str(path))
    return items


def split_pools(items: Sequence[Item]) -> dict[str, list[Item]]:
    """A user's items cut into the train, test, dev and check pools, disjoint by row.

    By the prompt's hash (:func:`pool_of`, order-independent) when every pool gets a row;
    otherwise (small files) by position: of every ten rows, rows 0-1 test, 2 dev, 3 check,
    the rest train.
    """
    pools: dict[str, list[Item]] = {"train": [], **{k: [] for k in POOLS}}
    for it in items:
        pools[pool_of(it.prompt)].append(it)
    if all(pools.values()):
        return pools
    pools = {"train": [], **{k: [] for k in POOLS}}
    by_pos = {0: "test", 1: "test", 2: "dev", 3: "check"}
    for i, it in enumerate(items):
        pools[by_pos.get(i % 10, "train")].append(it)
    return pools

