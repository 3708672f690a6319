"""Anatomy: one small adapter per architecture family mapping canonical names to native modules.

An :class:`AnatomySpec` is declarative (module paths relative to the model's ``base_model``);
:class:`Anatomy` binds a spec to a loaded model and answers "where is layer 3's attention output
projection" without converting or wrapping anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from excise.errors import ExciseError
from excise.models.anatomy import (  # noqa: F401  (registration)
    bert,
    bloom,
    distilbert,
    falcon,
    gemma,
    gpt2,
    gpt_neox,
    gptj,
    llama,
    modernbert,
    moe,
    phi,
    phi3,
    starcoder2,
    vlm_text,
)
from excise.models.anatomy.infer import check_family, infer_spec, prove
from excise.models.anatomy.spec import _REGISTRY, AnatomySpec, _cfg, _get, _has, _text_config, register
from excise.models.anatomy.vision import VisionAnatomy, VisionSpec, supported_vlm_types

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def spec_for_model_type(model_type: str) -> AnatomySpec:
    if model_type not in _REGISTRY:
        raise ExciseError(
            f"unsupported architecture family '{model_type}': excise has no anatomy for it "
            f"(missing: paths to layers, attention output projection, MLP down-projection); "
            f"supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type]



@dataclass
class Anatomy:
    """A spec bound to one model instance. Cheap to build; holds no tensors."""

    spec: AnatomySpec
    model: Any = field(repr=False)
    root: Any = field(repr=False)  # the module the spec's top-level paths are relative to
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    d_model: int = 0
    d_mlp: int = 0

    n_experts: int = 0  # mixture of experts: experts per sparse layer (0: dense model)
    top_k: int = 0  # experts each token is routed to
    d_expert: int = 0  # width of one expert's hidden (input of its down-projection)
    moe_layers: tuple[int, ...] = ()  # layers whose MLP is a sparse mixture of experts

    @classmethod
    def of(cls, model: "nn.Module") -> "Anatomy":
        """Bind the family's spec; a model type without one gets an inferred spec, proven on the model."""
        config = _text_config(model.config)
        model_type = getattr(config, "model_type", None) or "unknown"
        if model_type in _REGISTRY:
            return cls._bind(model, _REGISTRY[model_type], config)
        spec = infer_spec(model, config)  # refuses with what was found and what is missing
        anat = cls._bind(model, spec, config)
        anat.spec = prove(anat)  # refuses with the check that failed; measures in-place adds
        return anat

    @classmethod
    def _bind(cls, model: Any, spec: AnatomySpec, config: Any) -> "Anatomy":
        root = _find_root(model, spec)
        layers = _get(root, spec.layers)
        n_heads = int(_cfg(config, "num_attention_heads", "n_head"))
        n_kv = int(_cfg(config, "num_key_value_heads", default=n_heads) or n_heads)
        d_model = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
        head_dim = int(_cfg(config, "head_dim", default=d_model // n_heads))
        anat = cls(spec=spec, model=model, root=root, n_layers=len(layers), n_heads=n_heads,
                   n_kv_heads=n_kv, head_dim=head_dim, d_model=d_model)
        if spec.moe_experts:
            anat.moe_layers = tuple(l for l, layer in enumerate(layers) if _has(layer, spec.moe_experts))
        layer0 = layers[0] if len(layers) else None
        parts = ("attn", "attn_out", "mlp") + (("moe_router", "moe_experts") if 0 in anat.moe_layers else ("mlp_down",))
        for part in parts:
            path = getattr(spec, part)
            if not _has(layer0, path):
                raise ExciseError(
                    f"family '{spec.family}': {part} module '{path}' not found in layer 0 of {type(model).__name__}; "
                    "the model's layout differs from the anatomy excise knows"
                )
        in_features = anat.attn_out_in_features(0)
        if in_features != n_heads * head_dim:
            raise ExciseError(
                f"family '{spec.family}': attention output projection takes {in_features} inputs, "
                f"expected n_heads*head_dim = {n_heads}*{head_dim}; cannot split it by head"
            )
        if anat.moe_layers:
            experts = anat.experts(anat.moe_layers[0])
            anat.n_experts = int(experts.down_proj.shape[0])
            anat.d_expert = int(experts.down_proj.shape[-1])
            anat.top_k = int(_cfg(config, "num_experts_per_tok", "top_k", default=0))
        dense = [l for l in range(anat.n_layers) if l not in anat.moe_layers]
        anat.d_mlp = anat.mlp_down_in_features(dense[0]) if dense else anat.d_expert
        return anat

    # --- modules -------------------------------------------------------------------------
    def layers(self) -> Any:
        return _get(self.root, self.spec.layers)

    def layer(self, l: int) -> Any:
        self._check_layer(l)
        return self.layers()[l]

    def attn(self, l: int) -> Any:
        return _get(self.layer(l), self.spec.attn)

    def attn_out(self, l: int) -> Any:
        return _get(self.layer(l), self.spec.attn_out)

    def mlp(self, l: int) -> Any:
        return _get(self.layer(l), self.spec.mlp)

    def mlp_down(self, l: int) -> Any:
        if l in self.moe_layers:
            raise ExciseError(
                f"layer {l}'s MLP is a mixture of {self.n_experts} experts with fused weights: it has no single "
                "down-projection (mlp.L.hidden, neuron units); use mlp.L.expert.E.hidden, mlp.L.router or expert units"
            )
        return _get(self.layer(l), self.spec.mlp_down)

    def router(self, l: int) -> Any:
        """The MoE router of layer ``l`` (returns (logits [N, E], top_k_weights, top_k_index))."""
        self._check_moe(l)
        return _get(self.layer(l), self.spec.moe_router)

    def experts(self, l: int) -> Any:
        """The fused experts module of layer ``l`` (``gate_up_proj`` [E, 2*d_expert, d], ``down_proj`` [E, d, d_expert])."""
        self._check_moe(l)
        return _get(self.layer(l), self.spec.moe_experts)

    def _check_moe(self, l: int) -> None:
        self._check_layer(l)
        if l not in self.moe_layers:
            where = f"sparse layers: {list(self.moe_layers)}" if self.moe_layers else "the model is dense"
            raise ExciseError(f"layer {l} has no mixture of experts ({where}); router and expert sites need one")

    def embed(self) -> Any:
        return _get(self.root, self.spec.embed)

    def final_norm(self) -> Any:
        return _get(self.root, self.spec.final_norm) if self.spec.final_norm else None

    def lm_head(self) -> Any:
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if callable(get) else None

    def module_name(self, module: Any) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise KeyError("module not in model")

    # --- shapes --------------------------------------------------------------------------
    def attn_out_in_features(self, l: int) -> int:
        w = self.attn_out(l).weight
        return int(w.shape[0] if self.spec.attn_out_transposed else w.shape[1])

    def mlp_down_in_features(self, l: int) -> int:
        w = self.mlp_down(l).weight
        return int(w.shape[0] if self.spec.mlp_down_transposed else w.shape[1])

    def _check_layer(self, l: int) -> None:
        n = len(_get(self.root, self.spec.layers))
        if not 0 <= l < n:
            raise ExciseError(f"layer {l} out of range: the model has layers 0..{n - 1}")

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (what `excise inspect` prints)."""
        l0 = 0
        return {
            "family": self.spec.family,
            "model_type": getattr(_text_config(self.model.config), "model_type", None),
            "class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "modules": {
                "layers": self.module_name(self.layers()),
                "attn": self.module_name(self.attn(l0)).replace(".0.", ".{l}."),
                "attn_out": self.module_name(self.attn_out(l0)).replace(".0.", ".{l}."),
                "mlp_down": (self.module_name(self.mlp_down(l0)).replace(".0.", ".{l}.")
                             if l0 not in self.moe_layers else None),
                "embed": self.module_name(self.embed()),
            },
            "attn_out_transposed": self.spec.attn_out_transposed,
            "moe": ({"n_experts": self.n_experts, "top_k": self.top_k, "d_expert": self.d_expert,
                     "layers": list(self.moe_layers)} if self.moe_layers else None),
            "inferred": self.spec.inferred,
        }


def _find_root(model: Any, spec: AnatomySpec) -> Any:
    """The module under which ``spec.layers`` resolves: the base model, or a VLM's language model."""
    get_base = getattr(model, "get_base_model", None)  # a peft model: look inside the wrapped model
    if callable(get_base):
        model = get_base()
    candidates = [getattr(model, "base_model", model), model]
    for c in list(candidates):
        for attr in ("language_model", "text_model"):
            sub = getattr(c, attr, None)
            if sub is not None:
                candidates.append(sub)
                candidates.append(getattr(sub, "base_model", sub))
    for c in candidates:
        try:
            _get(c, spec.layers)
            return c
        except (AttributeError, IndexError):
            continue
    raise ExciseError(
        f"family '{spec.family}': module '{spec.layers}' not found in {type(model).__name__}; "
        "the model's layout differs from the anatomy excise knows"
    )


def anatomy_of(model: "nn.Module") -> Anatomy:
    return Anatomy.of(model)


__all__ = ["Anatomy", "AnatomySpec", "VisionAnatomy", "VisionSpec", "anatomy_of", "check_family", "register",
           "spec_for_model_type",
           "supported_model_types", "supported_vlm_types"]
