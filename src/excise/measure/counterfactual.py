"""Counterfactual matching metrics (Grep-BiasIR style): does a document's gender change its score?

Inputs are plain similarity arrays; embedding, mean pooling and the query/document pairing live
with the task and the model code. ``sim_fem[q, d]`` / ``sim_masc[q, d]`` is the similarity of
query q to the feminine / masculine version of its candidate document d (NaN where a query has
fewer candidates than the widest one); one candidate per query may be given as [Q].

:func:`counterfactual_matching` reports, as a :class:`~excise.measure.frame.GroupedResult`:

- ``cos_gap``: mean over (query, document) pairs of sim_masc - sim_fem (positive: masculine
  versions score higher), with a percentile bootstrap CI over *queries* (the documents of one
  query are not independent); over the relevant pairs when ``relevant_mask`` is given, and
  ``cos_gap_nonrelevant`` over the others;
- ``masc_higher``: share of those pairs where the masculine version scores strictly higher
  (Wilson CI; ties are counted in ``meta["ties"]``), and ``masc_higher_nonrelevant``;
- ``flip_rate``: share of queries with at least two candidates whose top-ranked document differs
  between the all-feminine and the all-masculine ranking (Wilson CI); undefined (n=0) with one
  candidate per query.

``groups`` (one value per query, e.g. the Grep-BiasIR bias category) adds ``by_group``.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import numpy as np

from excise.errors import ExciseError
from excise.measure.frame import GroupedResult
from excise.measure.stats import Estimate, bootstrap, wilson

__all__ = ["cosine", "counterfactual_matching"]


def cosine(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis, broadcasting the rest ([d] x [d] -> scalar array,
    [N, d] x [N, d] -> [N], [Q, 1, d] x [Q, D, d] -> [Q, D]); NaN where either vector is zero."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[-1] != b.shape[-1]:
        raise ExciseError(f"cosine: last dimensions differ ({a.shape[-1]} vs {b.shape[-1]})")
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _as_2d(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ExciseError(f"{name} must be [Q] or [Q, D], got shape {arr.shape}")
    return arr


def _scope_metrics(fem: np.ndarray, masc: np.ndarray, rel: np.ndarray, has_mask: bool, *,
                   n_boot: int, seed: int) -> tuple[dict[str, Estimate], int]:
    both = ~(np.isnan(fem) | np.isnan(masc))
    diff = np.where(both, masc - fem, 0.0)
    out: dict[str, Estimate] = {}
    ties = 0
    for suffix, sel in [("", rel & both)] + ([("_nonrelevant", ~rel & both)] if has_mask else []):
        sums, cnts = (diff * sel).sum(1), sel.sum(1).astype(float)

        def mean_gap(idx: np.ndarray, sums: np.ndarray = sums, cnts: np.ndarray = cnts) -> float:
            c = cnts[idx].sum()
            return float(sums[idx].sum() / c) if c > 0 else math.nan

        est = bootstrap(np.arange(fem.shape[0]), mean_gap, n_boot=n_boot, seed=seed)
        n_pairs = int(cnts.sum())
        out[f"cos_gap{suffix}"] = Estimate(est.value, est.lo, est.hi, n_pairs if est.defined else 0,
                                           "bootstrap over queries")
        out[f"masc_higher{suffix}"] = wilson(int(((diff > 0) & sel).sum()), n_pairs)
        if not suffix:
            ties = int(((diff == 0) & sel).sum())
    cand = ~np.isnan(fem) & ~np.isnan(masc)
    ranked = cand.sum(1) >= 2
    top_f = np.argmax(np.where(cand, fem, -np.inf), axis=1)
    top_m = np.argmax(np.where(cand, masc, -np.inf), axis=1)
    out["flip_rate"] = wilson(int((ranked & (top_f != top_m)).sum()), int(ranked.sum()))
    return out, ties


def counterfactual_matching(sim_fem: Sequence[float] | np.ndarray, sim_masc: Sequence[float] | np.ndarray, *,
                            relevant_mask: Sequence[bool] | np.ndarray | None = None,
                            groups: Sequence[Hashable] | np.ndarray | None = None,
                            n_boot: int = 1000, seed: int = 0, group_by: str = "category") -> GroupedResult:
    """Gap, share masculine-higher and top-document flip rate between gendered document versions."""
    fem, masc = _as_2d(sim_fem, "sim_fem"), _as_2d(sim_masc, "sim_masc")
    if fem.shape != masc.shape or fem.shape[0] == 0:
        raise ExciseError(f"sim_fem {fem.shape} and sim_masc {masc.shape} must have the same non-empty shape")
    if (np.isnan(fem) != np.isnan(masc)).any():
        raise ExciseError("sim_fem and sim_masc must have missing (NaN) candidates at the same places")
    has_mask = relevant_mask is not None
    rel = np.ones(fem.shape, bool) if relevant_mask is None else _as_2d(relevant_mask, "relevant_mask").astype(bool)
    if rel.shape != fem.shape:
        raise ExciseError(f"relevant_mask {rel.shape} must have the shape of the similarities {fem.shape}")
    overall, ties = _scope_metrics(fem, masc, rel, has_mask, n_boot=n_boot, seed=seed)
    by_group: dict[str, dict[str, Estimate]] = {}
    meta = {"n_queries": int(fem.shape[0]), "max_candidates": int(fem.shape[1]), "ties": ties,
            "relevant_only": has_mask, "n_boot": n_boot, "seed": seed}
    if groups is not None:
        g = np.asarray(groups, dtype=object).astype(str)
        if g.shape != (fem.shape[0],):
            raise ExciseError(f"groups must hold one value per query ({fem.shape[0]}), got shape {g.shape}")
        for name in sorted(set(g.tolist())):
            m = g == name
            by_group[name], _ = _scope_metrics(fem[m], masc[m], rel[m], has_mask, n_boot=n_boot, seed=seed)
    return GroupedResult(overall, by_group, {}, group_by, meta)
