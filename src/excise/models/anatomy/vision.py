"""Vision anatomy: where a vision-language model keeps its vision tower's blocks and its projector.

The text side of a VLM is an ordinary :class:`~excise.models.anatomy.Anatomy` (its language model,
or CLIP's text tower); this adapter adds the image side, declaratively per family, so the Trace
can address ``vision.{l}`` (output of vision block ``l``) and ``projector.out`` (what enters the
language model) without converting anything. Paths were read off ``named_modules()`` of tiny
random models in transformers 5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from excise.errors import ExciseError


@dataclass(frozen=True)
class VisionSpec:
    """Where a family keeps its vision parts, as dotted paths relative to the model's ``base_model``.

    ``flat``: the tower runs on all images' patches concatenated ([N, d], Qwen2-VL), not [B, P, d].
    ``pooled_projector``: the projector maps one pooled vector per image (CLIP's image embedding).
    """

    family: str
    model_types: tuple[str, ...]
    tower: str
    layers: str
    projector: str
    d_vision_keys: tuple[str, ...] = ("hidden_size",)
    has_cls: bool = False
    flat: bool = False
    pooled_projector: bool = False
    notes: str = ""


VISION_SPECS: dict[str, VisionSpec] = {}


def register_vision(spec: VisionSpec) -> VisionSpec:
    for mt in spec.model_types:
        VISION_SPECS[mt] = spec
    return spec


register_vision(VisionSpec(
    family="llava", model_types=("llava",), tower="vision_tower", layers="vision_tower.encoder.layers",
    projector="multi_modal_projector", has_cls=True,
    notes="vision.{l} keeps CLIP's CLS at position 0; the projector sees the features chosen by "
          "vision_feature_layer / vision_feature_select_strategy ('default' drops the CLS)"))
register_vision(VisionSpec(
    family="clip", model_types=("clip",), tower="vision_model", layers="vision_model.encoder.layers",
    projector="visual_projection", has_cls=True, pooled_projector=True,
    notes="projector.out is the image embedding [B, projection_dim] (from the post-layernormed CLS)"))
register_vision(VisionSpec(
    family="qwen2_vl", model_types=("qwen2_vl",), tower="visual", layers="visual.blocks", projector="visual.merger",
    d_vision_keys=("embed_dim",), flat=True,
    notes="patches of all images concatenated; the merger folds spatial_merge_size**2 patches into one token"))
register_vision(VisionSpec(
    family="qwen2_5_vl", model_types=("qwen2_5_vl",), tower="visual", layers="visual.blocks",
    projector="visual.merger", flat=True,
    notes="as qwen2_vl, but blocks and merger run in window order: each image's patches are permuted "
          "within that image (the model un-permutes after the merger)"))
register_vision(VisionSpec(
    family="idefics3", model_types=("idefics3", "smolvlm"), tower="vision_model",
    layers="vision_model.encoder.layers", projector="connector",
    notes="one row per (non-padding) image or image tile, no CLS; the connector pixel-shuffles "
          "scale_factor**2 patches into one token"))


def _get(root: Any, path: str) -> Any:
    # the package's own helper, repeated: importing it would make the package and this module a cycle
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def supported_vlm_types() -> list[str]:
    return sorted(VISION_SPECS)


def _unwrap(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)  # a peft model: look inside the wrapped model
    return get_base() if callable(get_base) else model


@dataclass
class VisionAnatomy:
    """A vision spec bound to one model instance. Cheap to build; holds no tensors."""

    spec: VisionSpec
    model: Any = field(repr=False)
    root: Any = field(repr=False)  # the module the spec's paths are relative to
    n_layers: int = 0
    d_vision: int = 0
    d_proj: int = 0  # width of projector.out (the language model's d_model; CLIP's projection_dim)
    patch_size: int = 0
    spatial_merge: int = 1  # patches folded into one projector token per side (Qwen2-VL, Idefics3)

    @classmethod
    def of(cls, model: Any) -> "VisionAnatomy":
        model = _unwrap(model)
        config = getattr(model, "config", None)
        vcfg = getattr(config, "vision_config", None)
        if vcfg is None:
            raise ExciseError(
                f"{type(model).__name__} is not a vision-language model (its config has no vision_config): "
                "vision.L and projector.out need one"
            )
        mt = getattr(config, "model_type", None) or "unknown"
        if mt not in VISION_SPECS:
            raise ExciseError(
                f"unsupported vision-language family '{mt}': excise has no vision anatomy for it; "
                f"supported: {', '.join(supported_vlm_types())}"
            )
        spec = VISION_SPECS[mt]
        root = None
        for c in dict.fromkeys([getattr(model, "base_model", model), model]):
            try:
                _get(c, spec.layers)
                root = c
                break
            except (AttributeError, IndexError):
                continue
        if root is None:
            raise ExciseError(
                f"family '{spec.family}': vision blocks '{spec.layers}' not found in {type(model).__name__}; "
                "the model's layout differs from the vision anatomy excise knows"
            )
        d_vision = next((getattr(vcfg, k) for k in spec.d_vision_keys if getattr(vcfg, k, None)), 0)
        merge = int(getattr(vcfg, "spatial_merge_size", None) or getattr(config, "scale_factor", None) or 1)
        anat = cls(spec=spec, model=model, root=root, n_layers=len(_get(root, spec.layers)),
                   d_vision=int(d_vision), patch_size=int(getattr(vcfg, "patch_size", 0) or 0), spatial_merge=merge)
        anat.d_proj = _out_features(anat.projector())
        return anat

    # --- modules -------------------------------------------------------------------------
    def tower(self) -> Any:
        return _get(self.root, self.spec.tower)

    def layers(self) -> Any:
        return _get(self.root, self.spec.layers)

    def layer(self, l: int) -> Any:
        if not 0 <= l < self.n_layers:
            raise ExciseError(f"vision layer {l} out of range: the vision tower has layers 0..{self.n_layers - 1}")
        return self.layers()[l]

    def projector(self) -> Any:
        return _get(self.root, self.spec.projector)

    # --- layout --------------------------------------------------------------------------
    def image_lengths(self, grid_thw: Any, at_projector: bool) -> list[int] | None:
        """Rows per image of a flat ([N, d]) capture, from the forward call's ``image_grid_thw``."""
        if not self.spec.flat or grid_thw is None:
            return None
        n = grid_thw.prod(-1)
        if at_projector:
            n = n // (self.spatial_merge ** 2)
        return [int(v) for v in n.tolist()]

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return {
            "family": self.spec.family,
            "n_layers": self.n_layers,
            "d_vision": self.d_vision,
            "d_proj": self.d_proj,
            "patch_size": self.patch_size,
            "has_cls": self.spec.has_cls,
            "flat": self.spec.flat,
            "modules": {"layers": names.get(id(self.layers())), "projector": names.get(id(self.projector()))},
            "notes": self.spec.notes,
        }


def _out_features(module: Any) -> int:
    """Width of a projector's output: the out_features of its last linear layer."""
    last = None
    for m in module.modules():
        if hasattr(m, "out_features"):
            last = m
    return int(last.out_features) if last is not None else 0


def vision_anatomy_of(model: Any) -> VisionAnatomy:
    return VisionAnatomy.of(model)
