"""The declarative part of an anatomy: where a family keeps its canonical modules, by model type."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnatomySpec:
    """Where the canonical parts live, as dotted paths.

    ``layers``, ``embed`` and ``final_norm`` are relative to the model's ``base_model``; the
    per-layer paths are relative to one layer.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    attn: str  # module whose forward returns (output, attention weights)
    attn_out: str  # attention output projection: its input is attn.z (heads concatenated)
    mlp: str
    mlp_down: str  # MLP down-projection: its input is mlp.hidden, its output mlp.out
    final_norm: str | None = None
    attn_out_transposed: bool = False  # GPT-2's Conv1D stores weight as [in, out]
    mlp_down_transposed: bool = False
    is_decoder: bool = True
    # the block adds into mlp_down's output in place (falcon's parallel blocks): Trace copies an
    # uncopied (pool="all", detached) mlp.L.out capture so it keeps the down-projection's output
    mlp_out_added_in_place: bool = False
    notes: str = ""


_REGISTRY: dict[str, AnatomySpec] = {}


def register(spec: AnatomySpec) -> AnatomySpec:
    for mt in spec.model_types:
        _REGISTRY[mt] = spec
    return spec
