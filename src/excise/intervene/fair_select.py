"""Checkpoint selection over a fair fine-tuning history: best utility, best fairness, window selection.

A history is the list of per-epoch rows written to ``training_history.json`` by
:func:`excise.intervene.fair_finetune.fair_finetune` (each row has ``epoch`` and the validation
metrics, e.g. ``val_macro_f1`` and ``val_eo_gap``). These functions are pure: they pick an epoch;
:func:`excise.intervene.fair_export.load_epoch` restores its adapter and heads.

Undefined figures (NaN / None: a validation set without two groups of a class, say) never win:
a row whose utility or fairness is undefined is not eligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Selection:
    """The chosen epoch, or ``epoch=None`` with the reason no checkpoint qualified."""

    epoch: int | None
    reason: str
    row: dict | None = None

    def __bool__(self) -> bool:
        return self.epoch is not None


def _num(row: dict, key: str) -> float:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _defined(rows: Sequence[dict], *keys: str) -> list[dict]:
    return [r for r in rows if all(not math.isnan(_num(r, k)) for k in keys)]


def best_util(history: Sequence[dict], utility: str = "val_macro_f1", fairness: str = "val_eo_gap") -> Selection:
    """The epoch with the highest ``utility``; ties go to the smaller fairness gap, then the earlier epoch."""
    rows = _defined(history, utility)
    if not rows:
        return Selection(None, f"no epoch has a defined '{utility}' ({len(history)} epochs)")
    gap = lambda r: _num(r, fairness) if not math.isnan(_num(r, fairness)) else math.inf  # noqa: E731
    best = min(rows, key=lambda r: (-_num(r, utility), gap(r), int(r["epoch"])))
    return Selection(int(best["epoch"]), f"highest {utility} = {_num(best, utility):.4f}", best)


def best_fairness(history: Sequence[dict], fairness: str = "val_eo_gap", utility: str = "val_macro_f1") -> Selection:
    """The epoch with the smallest fairness gap; ties go to the higher utility, then the earlier epoch."""
    rows = _defined(history, fairness)
    if not rows:
        return Selection(None, f"no epoch has a defined '{fairness}' ({len(history)} epochs)")
    util = lambda r: _num(r, utility) if not math.isnan(_num(r, utility)) else -math.inf  # noqa: E731
    best = min(rows, key=lambda r: (_num(r, fairness), -util(r), int(r["epoch"])))
    return Selection(int(best["epoch"]), f"smallest {fairness} = {_num(best, fairness):.4f}", best)


def select_window(history: Sequence[dict], *, start: int, end: int, threshold: float,
                  utility: str = "val_macro_f1", fairness: str = "val_eo_gap") -> Selection:
    """Within epochs ``start..end`` (inclusive), the most useful epoch whose fairness gap is at most ``threshold``.

    Ties in utility go to the smaller gap, then the earlier epoch. When no epoch qualifies the
    :class:`Selection` has ``epoch=None`` and a reason (no epoch in the window, undefined
    figures, or every gap over the threshold with the smallest one named).
    """
    if start > end:
        return Selection(None, f"empty window: start {start} > end {end}")
    window = [r for r in history if start <= int(r["epoch"]) <= end]
    if not window:
        have = [int(r["epoch"]) for r in history]
        span = f"{min(have)}..{max(have)}" if have else "none"
        return Selection(None, f"no checkpoint in epochs {start}..{end} (epochs trained: {span})")
    rows = _defined(window, utility, fairness)
    if not rows:
        return Selection(None, f"no checkpoint in epochs {start}..{end} has defined '{utility}' and '{fairness}'")
    ok = [r for r in rows if _num(r, fairness) <= threshold]
    if not ok:
        least = min(rows, key=lambda r: _num(r, fairness))
        return Selection(None, f"no checkpoint in epochs {start}..{end} has {fairness} <= {threshold:g}; the smallest "
                               f"is {_num(least, fairness):.4f} at epoch {int(least['epoch'])}")
    best = min(ok, key=lambda r: (-_num(r, utility), _num(r, fairness), int(r["epoch"])))
    return Selection(int(best["epoch"]), f"highest {utility} = {_num(best, utility):.4f} among {len(ok)} checkpoints in "
                                         f"epochs {start}..{end} with {fairness} <= {threshold:g}", best)


def summary(history: Sequence[dict], utility: str = "val_macro_f1", fairness: str = "val_eo_gap") -> dict[str, Any]:
    """``best_util`` and ``best_fairness`` epochs with their reasons (what ``training_history.json`` records)."""
    out = {}
    for name, sel in (("best_util", best_util(history, utility, fairness)),
                      ("best_fairness", best_fairness(history, fairness, utility))):
        out[name] = {"epoch": sel.epoch, "reason": sel.reason}
    return out


__all__ = ["Selection", "best_fairness", "best_util", "select_window", "summary"]
