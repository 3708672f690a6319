"""Arithmetic accuracy: exact match of the first number a model generates greedily.

Why greedy and the *first* number: the skill to forget is recalling the result, so a model
that rambles after a correct answer still knows it, and one that says nothing numeric does
not. Generation is :func:`excise.lm.generate` (prompts sorted by token length, so batches of
equal-length prompts need no padding).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Sequence

from excise import lm
from excise.measure.frame import GroupedResult
from excise.measure.stats import Estimate, bootstrap_diff, wilson

_NUM = re.compile(r"^\s*(-?\d+)")
GROUPS = {"forget": ("mul", "div"), "retain": ("add", "sub")}


def first_number(text: str) -> int | None:
    """The integer the continuation starts with (after spaces), or None."""
    m = _NUM.match(text)
    return int(m.group(1)) if m else None


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 5,
             batch_size: int = 256) -> list[str]:
    """Greedy continuations (decoded text) of each prompt."""
    return lm.generate(lm.Backend(model, tokenizer), prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def correctness(model: Any, tokenizer: Any, items: Sequence[Any], **kw: Any) -> list[bool]:
    """Per item: does the first generated number equal the answer?"""
    texts = generate(model, tokenizer, [it.prompt for it in items], **kw)
    return [first_number(t) == it.answer for t, it in zip(texts, items)]


def accuracy_by_op(model: Any, tokenizer: Any, items: Sequence[Any], **kw: Any) -> dict[str, Estimate]:
    """Accuracy (Wilson 95% CI) per operation, and pooled over the forget and retain groups."""
    ok = correctness(model, tokenizer, items, **kw)
    by: dict[str, list[bool]] = defaultdict(list)
    for it, c in zip(items, ok):
        by[it.op].append(c)
    res = {op: wilson(sum(v), len(v)) for op, v in sorted(by.items())}
    for g, ops in GROUPS.items():
        v = [c for op in ops for c in by.get(op, [])]
        res[g] = wilson(sum(v), len(v))  # undefined (NaN, n=0) when the group is absent
    return res


def accuracy_frame(model: Any, tokenizer: Any, items: Sequence[Any], *, n_boot: int = 1000, seed: int = 0,
                   **kw: Any) -> GroupedResult:
    """Accuracy as the shared result type: by operation, overall per forget/retain group, and the
    retain - forget difference (bootstrap CI): the gap that unlearning should open."""
    ok = correctness(model, tokenizer, items, **kw)
    res = GroupedResult.from_items({"accuracy": [float(c) for c in ok]}, [it.op for it in items], group_by="op",
                                   n_boot=n_boot, seed=seed)
    by_group = {g: [float(c) for it, c in zip(items, ok) if it.op in ops] for g, ops in GROUPS.items()}
    for g, v in by_group.items():
        res.overall[f"accuracy.{g}"] = wilson(int(sum(v)), len(v))
    res.differences["accuracy.retain - accuracy.forget"] = bootstrap_diff(
        by_group["retain"], by_group["forget"], n_boot=n_boot, seed=seed)
    return res
