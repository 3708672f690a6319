"""Calibration: temperature scaling, decision thresholds, expected calibration error, reliability data.

Pure functions of validation / test arrays (no model, no torch).

- :func:`temperature_scale` fits one temperature T > 0 by minimising the negative log-likelihood
  of ``softmax(logits / T)`` (``sigmoid(logit / T)`` for one logit per item) on validation data,
  as Guo et al. (2017). The NLL is convex in 1/T, hence unimodal in log T: a bounded Brent
  search over log T (scipy ``minimize_scalar``) finds it deterministically, with no seed.
- :func:`tune_threshold` picks the decision threshold of a binary classifier on validation data
  (predict positive iff ``prob >= t``) that maximises F1 or accuracy, optionally with the groups
  reweighted to equal total weight (a group-balanced validation set without dropping items).
- :func:`ece` and :func:`calibration_curve_data` share one binning: ``n_bins`` equal-width bins
  over [0, 1], right-closed (``(a, b]``, the first bin also holds 0), the same bin ids as
  :func:`sklearn.calibration.calibration_curve`. Binary tasks (``prob`` of shape [N] or [N, 2])
  use the positive-class probability against the 0/1 label (a reliability diagram, as
  scikit-learn); multiclass tasks ([N, C], C > 2) use the top-label confidence against
  correctness (Guo et al., 2017). ECE = sum over bins of |mean target - mean value| weighted by
  the bin's share of items.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax

from excise.errors import ExciseError
from excise.measure.stats import Estimate, bootstrap

KINDS = ("auto", "positive", "top_label")
THRESHOLD_METRICS = ("f1", "accuracy")


# --- shared binning -----------------------------------------------------------------------------

def calibration_terms(y: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                      kind: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """(value, target, kind) per item: what is binned and what it is compared with.

    ``positive``: the positive-class probability and the 0/1 label (binary only);
    ``top_label``: the largest probability and whether its class is the label.
    ``auto`` picks ``positive`` for [N] or [N, 2] and ``top_label`` for [N, C > 2].
    """
    if kind not in KINDS:
        raise ExciseError(f"calibration kind must be one of {KINDS}, got {kind!r}")
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(prob, dtype=float)
    if p.ndim not in (1, 2) or p.shape[0] != y.shape[0]:
        raise ExciseError(f"prob must be [N] or [N, C] with N = {y.shape[0]} labels, got shape {p.shape}")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ExciseError("prob has values outside [0, 1]: pass probabilities, not logits (see apply_temperature)")
    n_classes = 2 if p.ndim == 1 else p.shape[1]
    if kind == "auto":
        kind = "positive" if n_classes == 2 else "top_label"
    if kind == "positive":
        if n_classes != 2:
            raise ExciseError(f"kind='positive' needs a binary task, got {n_classes} classes")
        value = p if p.ndim == 1 else p[:, 1]
        return value, (y == 1).astype(float), kind
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float), kind


def bin_ids(value: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Equal-width bin of each value in [0, 1]; right-closed, as sklearn's calibration_curve."""
    if n_bins < 1:
        raise ExciseError(f"n_bins must be >= 1, got {n_bins}")
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], value)


def weighted_ece(value: np.ndarray, target: np.ndarray, bins: np.ndarray, w: np.ndarray, n_bins: int) -> float:
    """ECE with item weights (counts of a bootstrap resample, or a group mask); NaN if no weight."""
    total = float(w.sum())
    if total <= 0:
        return math.nan
    gap = np.bincount(bins, weights=w * (target - value), minlength=n_bins)
    return float(np.abs(gap).sum() / total)


def ece(y: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, n_bins: int = 15, *,
        kind: str = "auto", n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Expected calibration error with a percentile bootstrap CI over items (n_boot=0: no CI)."""
    value, target, _ = calibration_terms(y, prob, kind)
    bins = bin_ids(value, n_bins)

    def stat(idx: np.ndarray) -> float:
        w = np.bincount(idx, minlength=value.shape[0]).astype(float)
        return weighted_ece(value, target, bins, w, n_bins)

    est = bootstrap(np.arange(value.shape[0]), stat, n_boot=n_boot, seed=seed)
    return Estimate(est.value, est.lo, est.hi, est.n, f"ece-{n_bins}bins bootstrap")


@dataclass(frozen=True)
class CalibrationCurve:
    """Reliability-diagram data: per bin its edges, mean value, mean target and item count.

    Empty bins have NaN ``confidence`` / ``accuracy`` and ``count`` 0 (JSON null once saved).
    """

    kind: str
    bin_lo: list[float]
    bin_hi: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]
    ece: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("confidence", "accuracy"):
            d[k] = [None if math.isnan(x) else x for x in d[k]]
        d["ece"] = None if math.isnan(self.ece) else self.ece
        return d


def calibration_curve_data(y: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, n_bins: int = 15, *,
                           kind: str = "auto") -> CalibrationCurve:
    """Per-bin mean probability and observed frequency (the points of a reliability diagram)."""
    value, target, kind = calibration_terms(y, prob, kind)
    bins = bin_ids(value, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=value, minlength=n_bins) / count
        acc = np.bincount(bins, weights=target, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = weighted_ece(value, target, bins, np.ones(value.shape[0]), n_bins)
    return CalibrationCurve(kind, edges[:-1].tolist(), edges[1:].tolist(), conf.tolist(), acc.tolist(),
                            count.astype(int).tolist(), total)


# --- temperature scaling --------------------------------------------------------------------------

def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    if z.ndim == 1:  # one logit per item: p(y=1) = sigmoid(z)
        return float(-np.mean(np.where(y == 1, log_expit(z), log_expit(-z))))
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(y.shape[0]), y]))


def temperature_scale(logits_val: Sequence[float] | np.ndarray, y_val: Sequence[int] | np.ndarray, *,
                      bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T) (sigmoid for [N] logits).

    Deterministic (bounded Brent search over log T within ``bounds``). T > 1 softens an
    over-confident model. A T at a bound means the optimum may lie beyond it.
    """
    z = np.asarray(logits_val, dtype=float)
    y = np.asarray(y_val).astype(int).ravel()
    if z.ndim not in (1, 2) or z.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ExciseError(f"temperature_scale: logits must be [N] or [N, C] with N = {y.shape[0]} > 0 labels, "
                          f"got shape {z.shape}")
    n_classes = 2 if z.ndim == 1 else z.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ExciseError(f"temperature_scale: labels must be in 0..{n_classes - 1}")
    if not 0 < bounds[0] < bounds[1]:
        raise ExciseError(f"temperature_scale: bounds must satisfy 0 < lo < hi, got {bounds}")
    res = minimize_scalar(lambda t: _nll(z, y, math.exp(t)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-7})
    return float(math.exp(res.x))


def apply_temperature(logits: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling: sigmoid(z / T) for [N], softmax(z / T) for [N, C]."""
    if not temperature > 0:
        raise ExciseError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=float) / temperature
    return expit(z) if z.ndim == 1 else softmax(z, axis=1)


# --- decision threshold ---------------------------------------------------------------------------

def balanced_weights(groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Item weights giving every group the same total weight (mean weight 1)."""
    _, inv, counts = np.unique(np.asarray(groups).astype(str), return_inverse=True, return_counts=True)
    return inv.size / (counts.size * counts[inv].astype(float))


def tune_threshold(y_val: Sequence[int] | np.ndarray, prob_val: Sequence[float] | np.ndarray, *,
                   groups: Sequence[Any] | np.ndarray | None = None, balanced: bool = False,
                   metric: str = "f1") -> float:
    """The threshold t (predict positive iff prob >= t) maximising ``metric`` on validation data.

    Binary tasks only: ``prob_val`` is the positive-class probability ([N] or [N, 2]). With
    ``balanced=True`` every group in ``groups`` gets the same total weight. Every t in
    (next lower probability, chosen probability] gives the same validation predictions; the
    midpoint of that interval is returned. Ties between intervals go to the one nearest 0.5.
    """
    if metric not in THRESHOLD_METRICS:
        raise ExciseError(f"tune_threshold: metric must be one of {THRESHOLD_METRICS}, got {metric!r}")
    y = np.asarray(y_val).astype(int).ravel()
    p = np.asarray(prob_val, dtype=float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim != 1 or p.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ExciseError(f"tune_threshold: binary tasks only; prob must be [N] or [N, 2] with N = {y.shape[0]} > 0, "
                          f"got shape {np.shape(prob_val)}")
    if not np.isin(y, (0, 1)).all():
        raise ExciseError("tune_threshold: labels must be 0/1")
    if balanced and groups is None:
        raise ExciseError("tune_threshold: balanced=True needs groups")
    if groups is not None and len(groups) != y.shape[0]:
        raise ExciseError(f"tune_threshold: {len(groups)} groups for {y.shape[0]} labels")
    w = balanced_weights(groups) if balanced else np.ones(y.shape[0])
    uniq, inv = np.unique(p, return_inverse=True)  # ascending
    pos = np.bincount(inv, weights=w * y, minlength=uniq.size)[::-1]
    neg = np.bincount(inv, weights=w * (1 - y), minlength=uniq.size)[::-1]
    # option k (0..K): predict positive for the k highest distinct probabilities (k = 0: none)
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(neg)])
    fn, tn = tp[-1] - tp, fp[-1] - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        score = 2 * tp / (2 * tp + fp + fn) if metric == "f1" else (tp + tn) / (tp[-1] + fp[-1])
    score = np.nan_to_num(score, nan=-np.inf)
    desc = uniq[::-1]
    upper = np.concatenate([[max(1.0, desc[0])], desc])  # option k: t in (lower_k, upper_k]
    lower = np.concatenate([desc, [min(0.0, desc[-1])]])
    mid = (lower + upper) / 2
    if desc[0] >= 1.0:  # "predict none" needs t above the largest probability
        mid[0] = float(np.nextafter(desc[0], np.inf))
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
    return float(mid[best[np.argmin(np.abs(mid[best] - 0.5))]])
