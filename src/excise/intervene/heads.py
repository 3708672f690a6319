"""Soft pruning of attention heads by a per-head scale.

transformers 5 has no ``head_mask``; a head's contribution is its slice of the input of the
attention output projection (``attn.L.z``). Scaling that slice by ``s`` is exactly scaling the
matching columns of the projection's weight (rows, for GPT-2's transposed Conv1D), so the same
:class:`HeadScales` can be applied as a reversible hook or baked into the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save

from excise.errors import ExciseError
from excise.intervene.base import INTERVENTIONS, check_mask
from excise.io import atomic_write_bytes
from excise.locate.base import LocateData
from excise.trace import Edit, Trace
from excise.registry import Configured


class HeadScales:
    """Per-head multipliers, a dense [n_layers, n_heads] tensor (1 = untouched, 0 = removed)."""

    FILE = "head_scales.safetensors"

    def __init__(self, values: torch.Tensor):
        if values.dim() != 2:
            raise ExciseError("head scales must be a [n_layers, n_heads] tensor")
        self.values = values.detach().float().cpu()

    @classmethod
    def ones(cls, anatomy: Any) -> "HeadScales":
        return cls(torch.ones(anatomy.n_layers, anatomy.n_heads))

    @classmethod
    def from_heads(cls, anatomy: Any, heads: Iterable[tuple[int, int]], scale: float = 0.0) -> "HeadScales":
        hs = cls.ones(anatomy)
        for l, h in heads:
            if not (0 <= l < anatomy.n_layers and 0 <= h < anatomy.n_heads):
                raise ExciseError(f"head ({l}, {h}) out of range [{anatomy.n_layers} layers x {anatomy.n_heads} heads]")
            hs.values[l, h] = scale
        return hs

    @classmethod
    def from_mask(cls, mask: Any, scale: float = 0.0) -> "HeadScales":
        """From a head Mask (``excise.select``): selected heads get ``scale``."""
        if getattr(mask, "kind", "head") != "head":
            raise ExciseError(f"head scales need a mask over heads, got a mask over {mask.kind}s")
        values = torch.ones(mask.values.shape)
        values[mask.values.bool()] = scale
        return cls(values)

    def pruned(self) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in torch.nonzero(self.values != 1.0)]

    def check(self, anatomy: Any) -> None:
        if tuple(self.values.shape) != (anatomy.n_layers, anatomy.n_heads):
            raise ExciseError(
                f"head scales have shape {tuple(self.values.shape)}, the model has "
                f"[{anatomy.n_layers} layers x {anatomy.n_heads} heads]"
            )

    def save(self, directory: str | Path) -> Path:
        """Save as a small safetensors file next to the model or adapter."""
        path = Path(directory) / self.FILE
        data = save({"head_scales": self.values.contiguous()}, metadata={"format": "excise.head_scales/1"})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "HeadScales":
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        if not path.exists():
            raise ExciseError(f"no head scales at {path}")
        try:
            return cls(load_file(str(path))["head_scales"])
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ExciseError(f"cannot read head scales ({type(e).__name__})", where=str(path)) from None


class HeadScaleHook:
    """Reversible soft pruning: a ``Trace`` scale edit at each affected ``attn.L.z`` site."""

    def __init__(self, handle: Any, scales: HeadScales):
        self.anatomy = handle.anatomy
        scales.check(self.anatomy)
        self.scales = scales
        edits = [Edit(f"attn.{l}.z", "scale", value=scales.values[l].clone())
                 for l in range(self.anatomy.n_layers) if not torch.all(scales.values[l] == 1.0)]
        self._trace = Trace(handle, edits=edits)

    def attach(self) -> "HeadScaleHook":
        self._trace.attach()  # attaching twice is a no-op (``with scale_heads(...)`` enters an attached hook)
        return self

    def remove(self) -> None:
        self._trace.remove()

    def __enter__(self) -> "HeadScaleHook":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def scale_heads(handle: Any, scales: HeadScales) -> HeadScaleHook:
    """Attach reversible head scaling; call ``.remove()`` (or use as a context manager) to undo."""
    return HeadScaleHook(handle, scales).attach()


@torch.no_grad()
def bake_head_scales(handle: Any, scales: HeadScales) -> None:
    """Permanent soft pruning: multiply each head's columns of the attention output projection.

    For ``nn.Linear`` (weight [out, in]) the head's slice is columns; for GPT-2's ``Conv1D``
    (weight [in, out]) it is rows. The projection's bias belongs to no head and is kept.
    """
    an = handle.anatomy
    scales.check(an)
    for l in range(an.n_layers):
        s = scales.values[l]
        if torch.all(s == 1.0):
            continue
        w = an.attn_out(l).weight
        expanded = s.repeat_interleave(an.head_dim).to(device=w.device, dtype=w.dtype)
        if an.spec.attn_out_transposed:
            w.mul_(expanded.view(-1, 1))
        else:
            w.mul_(expanded.view(1, -1))


class HeadScaleConfig(BaseModel):
    """Settings of head soft-pruning."""

    model_config = {"extra": "forbid"}
    scale: float = Field(0.0, ge=0, description="multiplier of each selected head's output (0 removes it)")


@INTERVENTIONS.register
class HeadScale(Configured):
    """Soft-prune the selected heads: scale their columns of the attention output projection (a copy)."""

    name = "head_scale"
    Config = HeadScaleConfig
    accepts = ("head",)

    def apply(self, handle: Any, mask: Any, data: LocateData) -> Any:
        check_mask(self, mask)
        new = handle.with_model(copy.deepcopy(handle.model))
        scales = HeadScales.from_mask(mask, scale=self.config.scale)
        bake_head_scales(new, scales)
        new.extra["head_scales"] = scales
        return new
