"""The declarative part of an anatomy: where a family keeps its canonical modules, by model type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from excise.errors import ExciseError


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
    # mixture of experts (paths relative to one layer): the router returning (logits, weights, index)
    # and the fused experts module called as experts(x [N, d], top_k_index, top_k_weights). A layer
    # without them (qwen2_moe's mlp_only_layers) is dense and uses ``mlp_down``.
    moe_router: str | None = None
    moe_experts: str | None = None
    inferred: bool = False  # built by excise.models.anatomy.infer from the module tree, then proven
    notes: str = ""


_REGISTRY: dict[str, AnatomySpec] = {}


def register(spec: AnatomySpec) -> AnatomySpec:
    for mt in spec.model_types:
        _REGISTRY[mt] = spec
    return spec


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _has(root: Any, path: str | None) -> bool:
    if not path:
        return False
    try:
        _get(root, path)
        return True
    except (AttributeError, IndexError, TypeError):
        return False


def _text_config(config: Any) -> Any:
    """The config of the model's language model (the config itself for a text-only model)."""
    get = getattr(config, "get_text_config", None)
    if not callable(get):
        return config
    try:
        return get()
    except ValueError:  # transformers: several sub-configs could be the text one (musicgen: text_encoder, decoder)
        names = [n for n in ("text_encoder", "decoder", "generator", "text_config")
                 if getattr(config, n, None) is not None]
        if len(names) < 2:
            raise
        raise ExciseError(f"{getattr(config, 'model_type', None) or type(config).__name__}: several text configs "
                          f"({', '.join(names)}); excise needs one language model") from None


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` set on ``config`` (an object or a raw config.json dict)."""
    for n in names:
        v = config.get(n) if isinstance(config, dict) else getattr(config, n, None)
        if v is not None:
            return v
    return default
