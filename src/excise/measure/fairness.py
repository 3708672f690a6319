"""Fairness metrics of a classifier with a protected attribute: overall, per group, between groups.

:func:`fairness_report` turns labels, predictions, probabilities and one attribute's group values
into a :class:`~excise.measure.frame.GroupedResult`:

- ``overall`` and ``by_group[g]``: accuracy, macro-F1 (over the classes present, as
  scikit-learn), ROC-AUC (one-vs-rest macro for multiclass), PR-AUC (average precision, macro
  one-vs-rest for multiclass), expected calibration error (15 bins; see
  :mod:`excise.measure.calibration`), and the one-vs-rest rates ``selection_rate``, ``tpr``,
  ``fpr``, ``precision`` (binary: of the positive class; multiclass: ``tpr[<class>]`` ...).
  A rate's n is its denominator: a group with no positives has TPR "undefined (n=0)".
- ``differences`` (largest gap between any two groups with the metric defined, Fairlearn's
  ``difference(method="between_groups")``; ratios are the smallest min / max):
  ``dp_diff`` / ``dp_ratio`` (demographic parity: selection rates), ``tpr_gap``, ``fpr_gap``,
  ``eo_diff`` (equalized odds: max of the TPR and FPR gaps), ``pp_diff`` (predictive parity:
  precision gap), ``accuracy_gap``, ``macro_f1_gap``, ``roc_auc_gap``, ``ece_gap``. Multiclass
  tasks take them one-vs-rest per class and report the mean over classes, plus the worst class
  (``dp_diff_max``, ``dp_ratio_min``, ``eo_diff_max``, ``pp_diff_max``).
  The Bias-in-Bios gap (De-Arteaga et al., 2019): ``tpr_gap[<class>]`` = TPR(a) - TPR(b) per
  class, ``tpr_gap_rms`` and ``tpr_gap_corr`` (Pearson r of the per-class gaps with the share
  of group a among the class's items). Groups a, b: ``gap_groups``, else the two groups in
  sorted order ("F" - "M"); with more than two groups and no ``gap_groups``, the per-class gap is
  the unsigned max - min and the correlation is undefined.

Every cell is an Estimate with a seeded percentile bootstrap CI over items: resamples are drawn
by :func:`excise.measure.stats.bootstrap` and every metric is recomputed on each (by the weighted
kernel of :mod:`excise.measure.fairness_kernel`). Point values come from Fairlearn's
``MetricFrame`` and scikit-learn where they define them, checked against the kernel.
:func:`shuffled_group_floor` gives the gap one would see with group labels carrying no signal.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from excise.errors import ExciseError
from excise.measure.calibration import bin_ids, calibration_terms
from excise.measure.fairness_kernel import GroupKernel, Key
from excise.measure.frame import GroupedResult
from excise.measure.stats import Estimate, bootstrap

__all__ = ["fairness_report", "shuffled_group_floor", "NoiseFloor", "kernel_for"]


# --- inputs ---------------------------------------------------------------------------------------

def _groups(groups: Sequence[Hashable] | np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
    vals = np.asarray(groups, dtype=object).astype(str)
    if vals.shape != (n,):
        raise ExciseError(f"groups must hold one value per item ({n}), got shape {vals.shape}")
    if np.isin(vals, ("nan", "None", "")).any():
        raise ExciseError("groups has missing values (None / NaN / ''): drop or label those items first")
    names, inv = np.unique(vals, return_inverse=True)
    return [str(x) for x in names], inv.astype(np.int64)


def kernel_for(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
               groups: Sequence[Hashable] | np.ndarray, y_prob: Sequence[float] | np.ndarray | None = None, *,
               label_names: Sequence[str] | None = None, gap_groups: tuple[Hashable, Hashable] | None = None,
               n_bins: int = 15) -> tuple[GroupKernel, list[str], np.ndarray | None]:
    """Validate the inputs and build the weighted kernel: (kernel, group names, probabilities)."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    n = y.size
    if p.size != n or n == 0:
        raise ExciseError(f"y_true and y_pred must be non-empty and equally long, got {n} and {p.size}")
    if y.dtype.kind not in "iub" or p.dtype.kind not in "iub":
        raise ExciseError("y_true and y_pred must be integer class indices 0..C-1 (map label strings first)")
    y, p = y.astype(np.int64), p.astype(np.int64)
    prob = None if y_prob is None else np.asarray(y_prob, dtype=float)
    if prob is not None and (prob.ndim not in (1, 2) or prob.shape[0] != n):
        raise ExciseError(f"y_prob must be [N] (binary) or [N, C] with N = {n}, got shape {prob.shape}")
    if label_names is not None:
        n_classes = len(label_names)
    elif prob is not None:
        n_classes = 2 if prob.ndim == 1 else prob.shape[1]
    else:
        n_classes = max(2, int(max(y.max(), p.max())) + 1)
    if n_classes < 2 or (prob is not None and prob.ndim == 1 and n_classes != 2) or \
            (prob is not None and prob.ndim == 2 and prob.shape[1] != n_classes):
        raise ExciseError(f"{n_classes} classes do not match y_prob of shape {np.shape(y_prob)}")
    if min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= n_classes:
        raise ExciseError(f"y_true / y_pred must be class indices in 0..{n_classes - 1}")
    labels = [str(x) for x in label_names] if label_names is not None else [str(c) for c in range(n_classes)]
    names, g = _groups(groups, n)
    pair = None
    if gap_groups is not None:
        a, b = str(gap_groups[0]), str(gap_groups[1])
        if a not in names or b not in names or a == b:
            raise ExciseError(f"gap_groups {gap_groups} must be two different groups of {names}")
        pair = (names.index(a), names.index(b))
    elif len(names) == 2:
        pair = (0, 1)
    cal = None
    if prob is not None:
        value, target, _ = calibration_terms(y, prob)
        cal = (value, target, bin_ids(value, n_bins))
    kernel = GroupKernel(y, p, g, len(names), n_classes, labels, prob=prob, cal=cal, n_bins=n_bins, pair=pair)
    return kernel, names, prob


# --- library values (the point estimates) ---------------------------------------------------------

def _library_values(k: GroupKernel, names: list[str], prob: np.ndarray | None) -> dict[Key, float]:
    """What Fairlearn's MetricFrame and scikit-learn compute, under the kernel's keys."""
    out: dict[Key, float] = {}
    sf = np.asarray(names, dtype=object)[k.g]
    scopes = [(("g", i), k.g == i) for i in range(k.G)] + [(("o",), np.ones(k.n, bool))]

    def put(mf: MetricFrame, rename: Callable[[str], str]) -> None:
        for m, v in mf.overall.items():
            out[("o", rename(m))] = float(v)
        for gname, row in mf.by_group.iterrows():
            for m, v in row.items():
                out[("g", names.index(str(gname)), rename(m))] = float(v)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        put(MetricFrame(metrics={"accuracy": accuracy_score, "macro_f1": partial(f1_score, average="macro")},
                        y_true=k.y, y_pred=k.p, sensitive_features=sf), str)
        rates = {"selection_rate": selection_rate, "tpr": partial(true_positive_rate, pos_label=1),
                 "fpr": partial(false_positive_rate, pos_label=1),
                 "precision": partial(precision_score, zero_division=np.nan)}
        for c in k.classes:
            try:
                put(MetricFrame(metrics=rates, y_true=(k.y == c).astype(int), y_pred=(k.p == c).astype(int),
                                sensitive_features=sf), partial(k.name, c=c))
            except ValueError:  # a degenerate group: the kernel's value (NaN where undefined) stands
                continue
        if prob is None:
            return out
        for scope, mask in scopes:
            y, s = k.y[mask], prob[mask]
            present = np.bincount(y, minlength=k.C) > 0
            if not present.all():
                continue  # scikit-learn's macro averages need every class present (with >= 2 classes)
            if k.binary:
                s1 = s if s.ndim == 1 else s[:, 1]
                out[scope + ("roc_auc",)] = float(roc_auc_score(y, s1))
                out[scope + ("pr_auc",)] = float(average_precision_score(y, s1))
            else:
                if np.allclose(s.sum(1), 1.0):
                    out[scope + ("roc_auc",)] = float(roc_auc_score(y, s, multi_class="ovr", average="macro",
                                                                    labels=list(range(k.C))))
                out[scope + ("pr_auc",)] = float(average_precision_score(label_binarize(y, classes=list(range(k.C))),
                                                                         s, average="macro"))
    return out


# --- the report -----------------------------------------------------------------------------------

def _quantiles(boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    b = boots[~np.isnan(boots)]
    if b.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def fairness_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                    y_prob: Sequence[float] | np.ndarray | None, groups: Sequence[Hashable] | np.ndarray, *,
                    label_names: Sequence[str] | None = None, gap_groups: tuple[Hashable, Hashable] | None = None,
                    n_bins: int = 15, n_boot: int = 1000, seed: int = 0, group_by: str = "group") -> GroupedResult:
    """Utility, calibration and fairness of one classifier's predictions for one protected attribute.

    ``y_true`` / ``y_pred``: class indices 0..C-1; ``y_prob``: the positive-class probability
    [N] (binary), or [N, C], or None (no AUCs / ECE); ``groups``: one attribute value per item
    (two or more groups). ``n_boot=0`` skips the CIs (fast, e.g. per training epoch).
    """
    kernel, names, prob = kernel_for(y_true, y_pred, groups, y_prob, label_names=label_names,
                                     gap_groups=gap_groups, n_bins=n_bins)
    records: list[dict[Key, float]] = []

    def record(idx: np.ndarray) -> float:  # every metric of one resample; the first call is the full data
        records.append(kernel.values(np.bincount(idx, minlength=kernel.n).astype(float)))
        return 0.0

    bootstrap(np.arange(kernel.n), record, n_boot=n_boot, seed=seed)
    point, keys = records[0], list(records[0])
    boots = np.array([[r[key] for key in keys] for r in records[1:]], dtype=float).reshape(len(records) - 1, len(keys))
    lib = _library_values(kernel, names, prob)
    counts = kernel.counts()
    pair = f" ({names[kernel.pair[0]]} - {names[kernel.pair[1]]})" if kernel.pair else " (max - min)"
    overall: dict[str, Estimate] = {}
    by_group: dict[str, dict[str, Estimate]] = {name: {} for name in names}
    diffs: dict[str, Estimate] = {}
    for j, key in enumerate(keys):
        value = point[key]
        if math.isnan(value):
            est = Estimate.undefined("bootstrap")
        else:
            if key in lib and not math.isnan(lib[key]):
                if not math.isclose(lib[key], value, rel_tol=1e-9, abs_tol=1e-9):
                    raise RuntimeError(f"fairness kernel disagrees with Fairlearn/scikit-learn on {key}: "
                                       f"{value} vs {lib[key]}")
                value = lib[key]
            n = counts.get(key, kernel.n)
            method = "bootstrap" + (pair if key[0] == "d" and key[-1].startswith("tpr_gap[") else "")
            est = Estimate(value, *_quantiles(boots[:, j]), n, method)
        if key[0] == "o":
            overall[key[1]] = est
        elif key[0] == "g":
            by_group[names[key[1]]][key[2]] = est
        else:
            diffs[key[1]] = est
    sizes = np.bincount(kernel.g, minlength=kernel.G)
    meta = {"task": "binary" if kernel.binary else "multiclass", "classes": kernel.labels, "groups": names,
            "group_sizes": {name: int(s) for name, s in zip(names, sizes)}, "n_boot": n_boot, "seed": seed,
            "n_bins": n_bins, "bib_gap": pair.strip(" ()"),
            "undefined_in_groups": {name: sorted(m for m, e in ms.items() if not e.defined)
                                    for name, ms in by_group.items() if any(not e.defined for e in ms.values())}}
    return GroupedResult(overall, by_group, diffs, group_by, meta)


# --- noise floor ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseFloor:
    """A gap metric with the real group labels and its distribution with the labels permuted.

    ``mean`` / ``p95``: mean and 95th percentile over ``n_perm`` permutations; ``p_value``:
    (1 + #permutations with a gap >= observed) / (1 + n_perm). An observed gap below ``p95`` is
    within what chance group labels give on this many items.
    """

    metric: str
    observed: float
    mean: float
    p95: float
    p_value: float
    n_perm: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shuffled_group_floor(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                         groups: Sequence[Hashable] | np.ndarray,
                         metric: str | Callable[[np.ndarray, np.ndarray, np.ndarray], float] = "eo_diff",
                         n_perm: int = 200, seed: int = 0, *, label_names: Sequence[str] | None = None,
                         gap_groups: tuple[Hashable, Hashable] | None = None) -> NoiseFloor:
    """Noise floor of a gap: the metric with group labels randomly permuted across items (seeded).

    ``metric``: a name from :func:`fairness_report`'s ``differences`` that needs no probabilities
    (``eo_diff``, ``dp_diff``, ``tpr_gap_rms``, ``pp_diff``, ...), or a callable
    ``f(y_true, y_pred, groups) -> float``.
    """
    if n_perm < 1:
        raise ExciseError(f"n_perm must be >= 1, got {n_perm}")
    y, p = np.asarray(y_true), np.asarray(y_pred)
    grp = np.asarray(groups, dtype=object)
    if callable(metric):
        name, fn = getattr(metric, "__name__", "metric"), metric
    else:
        name = metric

        def fn(yy: np.ndarray, pp: np.ndarray, gg: np.ndarray) -> float:
            k, _, _ = kernel_for(yy, pp, gg, label_names=label_names, gap_groups=gap_groups)
            vals = k.values(np.ones(k.n))
            if ("d", name) not in vals:
                raise ExciseError(f"unknown gap metric {name!r}; one of "
                                  f"{sorted(key[1] for key in vals if key[0] == 'd')}")
            return vals[("d", name)]
    observed = float(fn(y, p, grp))
    rng = np.random.default_rng(seed)
    perm = np.array([fn(y, p, grp[rng.permutation(grp.size)]) for _ in range(n_perm)], dtype=float)
    perm = perm[~np.isnan(perm)]
    if perm.size == 0:
        return NoiseFloor(name, observed, math.nan, math.nan, math.nan, 0)
    p_value = (1 + int((perm >= observed).sum())) / (1 + perm.size) if not math.isnan(observed) else math.nan
    return NoiseFloor(name, observed, float(perm.mean()), float(np.quantile(perm, 0.95)), p_value, int(perm.size))
