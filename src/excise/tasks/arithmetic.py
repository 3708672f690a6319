"""Arithmetic task for robust unlearning (the UNDO setting, arXiv 2506.06278).

Items are equations (``12 * 7 = 84``) and templated word problems for + - * /. Addition and
subtraction draw operands from 1-50 (subtraction keeps a >= b so answers are non-negative);
multiplication and division draw operands from 1-20 and division is exact
(``(a*b) / b = a``). forget = multiplication and division, retain = addition and subtraction.

Why the split is by *string*: the skill to forget is the memorised operation, so every fact
recurs in many surface forms; an item belongs to the evaluation pool when a stable hash of its
prompt says so, and training samples are drawn only from the other strings. Eval strings are
therefore never seen in training, while the facts they ask about are.

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
EVAL_FRACTION = 0.1  # share of prompt strings reserved for evaluation (by stable hash)


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


def is_eval_string(prompt: str) -> bool:
    """Stable membership of a prompt string in the evaluation pool (crc32, not Python's salted hash)."""
    return (zlib.crc32(prompt.encode("utf-8")) % 1000) < int(EVAL_FRACTION * 1000)


def render(op: str, a: int, b: int, kind: str, rng: random.Random) -> str:
    if kind == "equation":
        return f"{a} {SYMBOL[op]} {b} = "
    tpl = TEMPLATES[op][0 if kind == "question" else 1]
    return tpl.format(a=a, b=b, n=rng.choice(NAMES), o=rng.choice(OBJECTS))


KIND_WEIGHTS = (("equation", 0.5), ("question", 0.25), ("word", 0.25))


def sample_item(op: str, rng: random.Random, split: Literal["train", "eval"]) -> Item:
    """Draw one item of ``op`` whose prompt string belongs to ``split``."""
    if op not in OPS:
        raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}")
    kinds, weights = zip(*KIND_WEIGHTS)
    for _ in range(10_000):
        a, b, c = rng.choice(_facts(op))
        kind = rng.choices(kinds, weights)[0]
        prompt = render(op, a, b, kind, rng)
        if is_eval_string(prompt) == (split == "eval"):
            return Item(prompt, c, op, kind)
    raise RuntimeError("could not draw an item from the requested split")  # pragma: no cover


def eval_items(ops: Sequence[str], n_per_op: int, seed: int = 0) -> list[Item]:
    """A fixed evaluation set: ``n_per_op`` distinct held-out prompts per operation."""
    rng = random.Random(f"eval-{seed}")
    out: list[Item] = []
    for op in ops:
        seen: set[str] = set()
        while len(seen) < n_per_op:
            it = sample_item(op, rng, "eval")
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

def load_items(path: str | Path, *, required_ops: Sequence[str] | None = None) -> list[Item]:
    """Read JSONL rows ``{"prompt": str, "answer": int, "op": str (optional)}``.

    Every bad row fails with ``file:line:field``. ``op`` defaults to ``"custom"``; when
    ``required_ops`` is given every row's op must be one of them.
    """
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
        unknown = set(row) - {"prompt", "answer", "op", "kind"}
        if unknown:
            raise ExciseError("unknown field", where=where(path, i, sorted(unknown)[0]))
        items.append(Item(prompt, int(ans), op, str(row.get("kind", "custom"))))
    if not items:
        raise ExciseError("no items in file", where=str(path))
    return items
