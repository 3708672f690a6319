"""Parameter-difference localizer: where did unlearning move the weights?

Why: the parameters an unlearning method changed most are where the forget skill's
output was wired; noising exactly those (targeted UNDO) should need less distillation than
noising everything. Scores are ``|theta_unlearned - theta_base|`` per parameter.

Masks (values in [0, 1], 1 = noise this parameter), as in the targeted-UNDO reference:
``binary`` keeps the top ``top_p`` fraction of each tensor; ``relative`` is each tensor's
difference divided by its maximum (every parameter gets a weight).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from excise.errors import ExciseError
from pydantic import BaseModel, Field

from excise.locate.base import LOCALIZERS, LocateData
from excise.units import Scores, aggregate_param_scores
from excise.registry import Configured


def param_diff_scores(base: Any, unlearned: Any) -> Scores:
    """``|theta_unlearned - theta_base|`` for every parameter the two models share by name and shape."""
    import torch

    b = dict(base.named_parameters())
    out = {}
    for name, p in unlearned.named_parameters():
        if name not in b:
            raise ExciseError(f"parameter '{name}' of the unlearned model is missing from the base model")
        if b[name].shape != p.shape:
            raise ExciseError(f"parameter '{name}': shapes differ ({tuple(b[name].shape)} vs {tuple(p.shape)})")
        with torch.no_grad():
            out[name] = (p.detach().float().cpu() - b[name].detach().float().cpu()).abs()
    return Scores(kind="param", values=out, method="paramdiff")


def param_masks(scores: Scores, *, top_p: float = 0.1, mode: Literal["binary", "relative"] = "binary",
                include: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per-tensor masks from parameter scores.

    ``binary``: 1 on the ``top_p`` fraction of entries with the largest score in each tensor
    (ties broken by index, so the mask size is exact). ``relative``: score / max score of the
    tensor (0 where a tensor did not change). ``include`` keeps only names containing one of
    the given substrings (e.g. ``("mlp",)``).
    """
    import torch

    if scores.kind != "param" or not isinstance(scores.values, Mapping):
        raise ExciseError(f"param_masks needs parameter scores, got '{scores.kind}'")
    if not 0 < top_p <= 1:
        raise ExciseError(f"top_p must be in (0, 1], got {top_p}")
    if mode not in ("binary", "relative"):
        raise ExciseError(f"unknown mask mode '{mode}'; choose binary or relative")
    masks: dict[str, Any] = {}
    for name, s in scores.values.items():
        if include is not None and not any(k in name for k in include):
            continue
        s = torch.nan_to_num(s.float(), nan=0.0)
        if mode == "relative":
            mx = float(s.max()) if s.numel() else 0.0
            masks[name] = s / mx if mx > 0 else torch.zeros_like(s)
        else:
            k = max(1, int(round(top_p * s.numel())))
            order = torch.sort(s.flatten(), descending=True, stable=True).indices[:k]
            m = torch.zeros(s.numel())
            m[order] = 1.0
            masks[name] = m.view_as(s)
    return masks


def mask_summary(masks: Mapping[str, Any], model: Any) -> dict:
    """Fraction of all parameters covered (sum of mask values / parameter count)."""
    total = sum(p.numel() for p in model.parameters())
    covered = sum(float(m.sum()) for m in masks.values())
    return {"n_tensors": len(masks), "covered_fraction": covered / max(total, 1)}


class ParamDiffConfig(BaseModel):
    """Settings of the parameter-difference localizer."""

    model_config = {"extra": "forbid"}
    unit: Literal["param", "head", "neuron"] = Field(
        "param", description="param: one score per weight; head/neuron: summed over each unit's input columns")


@LOCALIZERS.register
class ParamDiffLocalizer(Configured):
    """|theta_reference - theta|: where another version of the model (e.g. an unlearned one) moved the weights."""

    name = "paramdiff"
    Config = ParamDiffConfig
    needs = ("reference",)

    def score(self, handle: Any, data: LocateData) -> Scores:
        data.require(self.needs, self.name)
        sc = param_diff_scores(handle.model, data.reference.model)
        return aggregate_param_scores(sc, handle.anatomy, self.config.unit)
