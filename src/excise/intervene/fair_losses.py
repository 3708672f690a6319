"""The fairness terms of :mod:`excise.intervene.fair_finetune`: gradient reversal and soft parity gaps.

* :func:`grad_reverse` is the gradient-reversal layer of Ganin & Lempitsky (2015): identity
  forward, gradient multiplied by ``-scale`` backward. An adversary trained on
  ``grad_reverse(z)`` minimises its loss while the encoder under it maximises it, which is the
  adversarial debiasing of Zhang et al. (2018) in Ganin's one-loss form (Zhang's extra
  projection of the task gradient away from the adversary's is not implemented).
* :func:`dp_gap` / :func:`eo_gap` are differentiable demographic-parity and equalized-odds
  regularisers on the task head's probabilities ``p [B, C]`` over a batch (see their docs).
* :func:`ovr_gaps` is the per-epoch fairness figure of the trainer (plain numpy, hard
  predictions). It is deliberately small: :mod:`excise.measure.fairness` computes the reported
  figures with CIs; this one only ranks checkpoints.

Multi-valued groups: ``reduction="max_pairwise"`` takes the largest gap between any two groups
present (``max - min`` of the group means; for two groups, the absolute difference);
``reduction="mean_sq"`` takes the mean over present groups of the squared deviation of the group
mean from the batch mean (smooth everywhere, smaller scale: two equal-sized groups with gap ``d``
give ``d**2 / 4``). Groups absent from a batch are skipped; with fewer than two groups present a
term is 0 (no signal), never NaN.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Reduction = Literal["max_pairwise", "mean_sq"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by ``-scale`` (Ganin & Lempitsky, 2015)."""
    return _GradReverse.apply(x, float(scale))


class GradReverse(torch.nn.Module):
    """:func:`grad_reverse` as a module (``scale`` is the lambda of the adversarial term)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _group_gap(values: torch.Tensor, groups: torch.Tensor, select: torch.Tensor, reduction: Reduction) -> torch.Tensor | None:
    """Gap between groups of the mean of ``values [B, K]`` over rows in ``select``: [K], or None (< 2 groups)."""
    means = []
    for g in torch.unique(groups[select]):
        rows = select & (groups == g)
        means.append(values[rows].mean(0))
    if len(means) < 2:
        return None
    m = torch.stack(means)  # [G, K]
    if reduction == "max_pairwise":
        return m.max(0).values - m.min(0).values
    if reduction == "mean_sq":
        overall = values[select].mean(0)
        return ((m - overall) ** 2).mean(0)
    raise ValueError(f"unknown reduction '{reduction}'")


def dp_gap(probs: torch.Tensor, groups: torch.Tensor, reduction: Reduction = "max_pairwise") -> torch.Tensor:
    """Soft demographic-parity gap: for each class, the gap between groups of the mean predicted
    probability of that class; averaged over classes. ``probs [B, C]``, ``groups [B]`` (ints)."""
    gap = _group_gap(probs, groups, torch.ones_like(groups, dtype=torch.bool), reduction)
    return probs.sum() * 0.0 if gap is None else gap.mean()


def eo_gap(probs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
           reduction: Reduction = "max_pairwise") -> torch.Tensor:
    """Soft equalized-odds gap, one-vs-rest: for each class ``c``, the between-group gap of the
    mean ``p_c`` among items with true label ``c`` (soft TPR) and among items with another label
    (soft FPR); the two gaps are averaged, then the classes. Classes (or their complement) seen
    in fewer than two groups of the batch contribute nothing; none at all gives 0."""
    terms = []
    for c in range(probs.shape[1]):
        for select in (labels == c, labels != c):
            if select.any():
                gap = _group_gap(probs[:, c:c + 1], groups, select, reduction)
                if gap is not None:
                    terms.append(gap[0])
    return probs.sum() * 0.0 if not terms else torch.stack(terms).mean()


def ovr_gaps(y_true, y_pred, groups) -> dict[str, float]:
    """Mean one-vs-rest TPR, equalized-odds and demographic-parity gaps of hard predictions (NaN: undefined).

    For each class ``c``: TPR_g = P(pred = c | y = c, group g), FPR_g = P(pred = c | y != c, g)
    over groups with at least one such item; the class's TPR gap is max - min over groups (needs
    two groups), its EO gap max(TPR gap, FPR gap). ``tpr_gap`` / ``eo_gap`` average over the
    classes where they are defined (the Bias-in-Bios TPR gap and Fairlearn's equalized-odds
    difference, one class against the rest). ``dp_gap``: per class, max - min over groups of
    P(pred = c | g), averaged over classes.
    """
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    tpr_gaps, eo_gaps = [], []
    for c in np.unique(y_true):
        rates = {"tpr": [], "fpr": []}
        for g in np.unique(groups):
            in_g = groups == g
            for name, sel in (("tpr", in_g & (y_true == c)), ("fpr", in_g & (y_true != c))):
                if sel.any():
                    rates[name].append(float((y_pred[sel] == c).mean()))
        tg = max(rates["tpr"]) - min(rates["tpr"]) if len(rates["tpr"]) >= 2 else float("nan")
        fg = max(rates["fpr"]) - min(rates["fpr"]) if len(rates["fpr"]) >= 2 else float("nan")
        if not np.isnan(tg):
            tpr_gaps.append(tg)
            eo_gaps.append(tg if np.isnan(fg) else max(tg, fg))
    dp_gaps = []
    present = np.unique(groups)
    if len(present) >= 2:
        for c in np.union1d(np.unique(y_true), np.unique(y_pred)):
            rates = [float((y_pred[groups == g] == c).mean()) for g in present]
            dp_gaps.append(max(rates) - min(rates))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"tpr_gap": mean(tpr_gaps), "eo_gap": mean(eo_gaps), "dp_gap": mean(dp_gaps)}


__all__ = ["GradReverse", "Reduction", "dp_gap", "eo_gap", "grad_reverse", "ovr_gaps"]
