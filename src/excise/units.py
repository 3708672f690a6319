"""Units: what a localizer scores and an intervention acts on.

Scores over units are dense tensors with a named unit kind, so any localizer can feed any
selection and any intervention:

* ``head``    -> tensor [n_layers, n_heads]          (attention heads)
* ``neuron``  -> tensor [n_layers, d_mlp]            (MLP hidden units, input of down-proj)
* ``feature`` -> tensor [n_layers, n_features]       (dictionary features, e.g. SAE / SNMF)
* ``expert``  -> tensor [n_layers, n_experts]        (mixture-of-experts experts; dense layers NaN)
* ``param``   -> dict {parameter name: tensor}       (parameter slices)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from excise.errors import ExciseError
from excise.io import atomic_write_bytes, canonical_safetensors

UNIT_KINDS = ("head", "neuron", "feature", "param", "expert")


@dataclass
class Scores:
    """Scores over units of one kind; higher means "more responsible for the behaviour"."""

    kind: str
    values: torch.Tensor | dict[str, torch.Tensor]
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise ExciseError(f"unknown unit kind '{self.kind}'; choose one of {', '.join(UNIT_KINDS)}")

    def ranked(self, k: int | None = None) -> list[tuple[tuple[int, int], float]]:
        """Units sorted by score (descending) as ((layer, index), score)."""
        if isinstance(self.values, dict):
            raise ExciseError("ranked() is for layered units, not parameter scores")
        flat = self.values.flatten()
        # NaN (undefined) scores rank last, ties keep index order
        key = torch.nan_to_num(flat.detach().float(), nan=float("-inf"))
        order = torch.sort(key, descending=True, stable=True).indices
        if k is not None:
            order = order[:k]
        width = self.values.shape[1]
        return [((int(i) // width, int(i) % width), float(flat[i])) for i in order]

    def to_rows(self) -> list[dict[str, Any]]:
        """Long-format rows (layer, index, score, rank) for CSV reports."""
        rows = []
        for rank, ((l, i), s) in enumerate(self.ranked(), start=1):
            rows.append({"rank": rank, "layer": l, self.kind: i, "score": s, "method": self.method})
        return rows

    def save(self, path: str) -> None:
        tensors = self.values if isinstance(self.values, dict) else {"values": self.values}
        data = canonical_safetensors(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                          metadata={"kind": self.kind, "method": self.method}))
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str) -> "Scores":
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        values: Any = tensors["values"] if list(tensors) == ["values"] else tensors
        return cls(kind=meta.get("kind", "head"), values=values, method=meta.get("method", ""))


# --- moving between unit kinds ------------------------------------------------------------------
# A head is the slice of the attention output projection's input that it writes (attn.L.z), a
# neuron the matching input column of the MLP down-projection. These two maps make any
# localizer usable by any intervention: parameter scores (Fisher, parameter difference) summed
# into head or neuron scores, and head or neuron masks spread onto parameter masks (noise,
# gradient masks).

def _unit_weight(anatomy: Any, kind: str, layer: int) -> tuple[str, torch.Tensor, bool]:
    """(parameter name, weight, transposed) of the projection whose input columns are the units."""
    if kind == "head":
        mod, transposed = anatomy.attn_out(layer), anatomy.spec.attn_out_transposed
    elif kind == "neuron":
        mod, transposed = anatomy.mlp_down(layer), anatomy.spec.mlp_down_transposed
    else:
        raise ExciseError(f"unit kind '{kind}' has no parameter slice; use head or neuron")
    return anatomy.module_name(mod) + ".weight", mod.weight, transposed


def _expert_params(anatomy: Any, layer: int) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of layer's fused expert weights: an expert is the slice [e] of each ([E, ...])."""
    experts = anatomy.experts(layer)
    prefix = anatomy.module_name(experts)
    return [(f"{prefix}.{n}", p) for n, p in experts.named_parameters(recurse=False)
            if p.dim() and p.shape[0] == anatomy.n_experts]


def aggregate_param_scores(scores: Scores, anatomy: Any, kind: str) -> Scores:
    """Sum parameter scores over each head's (or neuron's) input columns, or each expert's slices -> [n_layers, n_units]."""
    if kind == "param":
        return scores
    if not isinstance(scores.values, dict):
        raise ExciseError(f"aggregate_param_scores needs parameter scores, got '{scores.kind}' scores")
    if kind == "expert":
        out = torch.full((anatomy.n_layers, anatomy.n_experts), float("nan"))
        for l in anatomy.moe_layers:
            parts = [scores.values[n].float().flatten(1).sum(1) for n, _ in _expert_params(anatomy, l)
                     if n in scores.values]
            if parts:
                out[l] = torch.stack(parts).sum(0)
        return Scores(kind, out, method=f"{scores.method}->{kind}", meta=dict(scores.meta))
    width = anatomy.n_heads if kind == "head" else anatomy.d_mlp
    out = torch.full((anatomy.n_layers, width), float("nan"))
    for l in range(anatomy.n_layers):
        name, _, transposed = _unit_weight(anatomy, kind, l)
        v = scores.values.get(name)
        if v is None:
            continue
        cols = (v if transposed else v.T).float().reshape(width, -1, v.shape[1] if transposed else v.shape[0])
        out[l] = cols.sum(dim=(1, 2))
    return Scores(kind, out, method=f"{scores.method}->{kind}", meta=dict(scores.meta))


def unit_param_masks(anatomy: Any, kind: str, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spread a head, neuron or expert mask [n_layers, n_units] onto 0/1 masks of the weights they own."""
    mask = torch.as_tensor(mask).bool()
    if kind == "expert":
        if tuple(mask.shape) != (anatomy.n_layers, anatomy.n_experts) or not anatomy.n_experts:
            raise ExciseError(f"expert mask of shape {tuple(mask.shape)} does not fit the model "
                              f"({anatomy.n_layers}, {anatomy.n_experts})")
        return {n: mask[l].to(torch.float32).view(-1, *([1] * (p.dim() - 1))).expand(p.shape).clone()
                for l in anatomy.moe_layers for n, p in _expert_params(anatomy, l)}
    width = anatomy.n_heads if kind == "head" else anatomy.d_mlp
    if tuple(mask.shape) != (anatomy.n_layers, width):
        raise ExciseError(f"{kind} mask of shape {tuple(mask.shape)} does not fit the model ({anatomy.n_layers}, {width})")
    out = {}
    for l in range(anatomy.n_layers):
        name, w, transposed = _unit_weight(anatomy, kind, l)
        per = (w.shape[0] if transposed else w.shape[1]) // width
        cols = mask[l].repeat_interleave(per).to(torch.float32)
        out[name] = (cols[:, None].expand(w.shape) if transposed else cols[None, :].expand(w.shape)).clone()
    return out
