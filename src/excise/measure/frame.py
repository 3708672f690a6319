"""One result type for every evaluator: metrics overall, by group, and between groups.

Modelled on Fairlearn's ``MetricFrame``: a result knows its metrics on all items (``overall``),
on each group (``by_group``: BBQ category, concept probe family, arithmetic operation,
protected attribute) and the differences a user asks about (``differences``: the largest
between-group gap of a metric, or a named contrast such as aligned - conflicting). Every cell
is an :class:`~excise.measure.stats.Estimate` (value, 95% CI, n), so an undefined number is
NaN with n = 0 and never 0. The same type is written to JSON/CSV by every workflow, and
:meth:`GroupedResult.compare` puts two results (before / after) side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from excise.io import atomic_write_csv, atomic_write_json
from excise.measure.stats import Estimate, bootstrap_diff, mean_ci, wilson


def estimate_dict(e: Estimate) -> dict[str, Any]:
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n, "method": e.method}


def estimate_from_dict(d: Mapping[str, Any]) -> Estimate:
    def f(x: Any) -> float:
        return math.nan if x is None else float(x)

    return Estimate(f(d.get("value")), f(d.get("lo")), f(d.get("hi")), int(d.get("n") or 0), str(d.get("method", "")))


def proportion_or_mean(values: Sequence[float]) -> Estimate:
    """Wilson interval for 0/1 outcomes, a t interval for anything else (NaNs dropped)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size and np.isin(x, (0.0, 1.0)).all():
        return wilson(int(x.sum()), int(x.size))
    return mean_ci(x)


@dataclass
class GroupedResult:
    """Metrics overall, by group and between groups; each cell an Estimate with n and a 95% CI."""

    overall: dict[str, Estimate]
    by_group: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    differences: dict[str, Estimate] = field(default_factory=dict)
    group_by: str = "group"
    meta: dict[str, Any] = field(default_factory=dict)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_items(cls, values: Mapping[str, Sequence[float]], groups: Sequence[str], *, group_by: str = "group",
                   n_boot: int = 1000, seed: int = 0, meta: Mapping[str, Any] | None = None) -> "GroupedResult":
        """Per-item metric values (one list per metric, aligned with ``groups``) -> a result.

        Each metric is a mean over items (a proportion for 0/1 values). ``differences`` holds,
        per metric, the gap between the best and the worst group (Fairlearn's
        ``difference(method="between_groups")``) with a bootstrap CI over both groups' items.
        """
        names = sorted(set(groups))
        overall = {m: proportion_or_mean(v) for m, v in values.items()}
        by_group = {g: {m: proportion_or_mean([x for x, gg in zip(v, groups) if gg == g]) for m, v in values.items()}
                    for g in names}
        diffs: dict[str, Estimate] = {}
        for m, v in values.items():
            defined = [g for g in names if by_group[g][m].defined]
            if len(defined) < 2:
                diffs[m] = Estimate.undefined("between-groups")
                continue
            hi = max(defined, key=lambda g: by_group[g][m].value)
            lo = min(defined, key=lambda g: by_group[g][m].value)
            a = [x for x, gg in zip(v, groups) if gg == hi]
            b = [x for x, gg in zip(v, groups) if gg == lo]
            d = bootstrap_diff(a, b, n_boot=n_boot, seed=seed)
            diffs[m] = Estimate(d.value, d.lo, d.hi, d.n, f"between-groups ({hi} - {lo})")
        return cls(overall, by_group, diffs, group_by, dict(meta or {}))

    # --- access --------------------------------------------------------------------------------

    @property
    def metrics(self) -> list[str]:
        return list(self.overall)

    def __getitem__(self, metric: str) -> Estimate:
        return self.overall[metric]

    def group(self, name: str) -> dict[str, Estimate]:
        return self.by_group[name]

    def difference(self, metric: str) -> Estimate:
        return self.differences.get(metric, Estimate.undefined("between-groups"))

    # --- output --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {"format": "excise.grouped/1", "group_by": self.group_by,
                "overall": {m: estimate_dict(e) for m, e in self.overall.items()},
                "by_group": {g: {m: estimate_dict(e) for m, e in ms.items()} for g, ms in self.by_group.items()},
                "differences": {m: estimate_dict(e) for m, e in self.differences.items()}, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GroupedResult":
        return cls({m: estimate_from_dict(e) for m, e in d["overall"].items()},
                   {g: {m: estimate_from_dict(e) for m, e in ms.items()} for g, ms in d.get("by_group", {}).items()},
                   {m: estimate_from_dict(e) for m, e in d.get("differences", {}).items()},
                   d.get("group_by", "group"), dict(d.get("meta", {})))

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (scope, metric); scope is 'overall', a group, or 'difference'."""
        out = [{"scope": "overall", "metric": m, **estimate_dict(e)} for m, e in self.overall.items()]
        for g, ms in self.by_group.items():
            out += [{"scope": f"{self.group_by}={g}", "metric": m, **estimate_dict(e)} for m, e in ms.items()]
        out += [{"scope": "difference", "metric": m, **estimate_dict(e)} for m, e in self.differences.items()]
        return out

    def text(self, title: str = "") -> str:
        lines = [title] if title else []
        for scope, ms in [("overall", self.overall)] + [(f"{self.group_by}={g}", v) for g, v in self.by_group.items()] + \
                [("difference", self.differences)]:
            for m, e in ms.items():
                lines.append(f"{scope:<28} {m:<28} {e}")
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path, name: str = "result") -> list[Path]:
        """``<name>.json`` (this object) and ``<name>.csv`` (long rows; undefined cells empty), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / f"{name}.json", self.as_dict())
        atomic_write_csv(directory / f"{name}.csv", self.rows(), ["scope", "metric", "value", "lo", "hi", "n", "method"])
        return [directory / f"{name}.json", directory / f"{name}.csv"]


def compare(before: GroupedResult, after: GroupedResult) -> list[dict[str, Any]]:
    """Side-by-side rows (scope, metric, before, after) for every cell present in both results."""
    a, b = {(r["scope"], r["metric"]): r for r in before.rows()}, {(r["scope"], r["metric"]): r for r in after.rows()}
    keep = ("value", "lo", "hi", "n")
    return [{"scope": s, "metric": m, **{f"before_{k}": a[(s, m)][k] for k in keep},
             **{f"after_{k}": b[(s, m)][k] for k in keep}} for (s, m) in a if (s, m) in b]


