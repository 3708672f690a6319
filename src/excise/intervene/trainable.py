"""One way to make a model trainable: LoRA, masked LoRA, or full (optionally gradient-masked) fine-tuning.

``make_trainable(model, method, lora, mask=, seed=)`` returns a :class:`Trainable` whose ``model``
goes to :func:`excise.train.train`:

* ``lora``: a peft adapter built from :class:`LoraFields` (peft's own ``LoraConfig`` field
  names); the base weights are frozen and provably unchanged.
* ``masked_lora``: the column-masked adapter of :mod:`excise.intervene.masked_lora` on the
  modules whose inputs are the units of a :class:`excise.select.Mask` (neurons or heads);
  units outside the mask are bit-for-bit untouched (``Trainable.masked`` keeps the proofs).
* ``full``: every weight trains; with ``mask`` (parameter name -> 0/1 tensor of its shape) only
  the named parameters train and their gradients are zeroed outside the mask ("masked"
  fine-tuning, how the planted model is built).

``LoraFields`` states the LoRA defaults once for the whole project: r = 8, lora_alpha = 16
(Hu et al., 2021; scale alpha / r = 2), dropout 0 (deterministic runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import peft
import torch
from pydantic import BaseModel, Field, model_validator

from excise.errors import ExciseError
from excise.intervene.masked_lora import MaskedLora, arm, column_mask, module_names
from excise.models.anatomy import Anatomy

_INTERNAL = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
_RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout", "layers": "layers_to_transform"}  # excise's old names


class LoraFields(BaseModel):
    """peft ``LoraConfig`` fields, under peft's names; any other ``LoraConfig`` field may be given too."""

    model_config = {"extra": "allow"}
    r: int = Field(8, ge=1, description="adapter rank")
    lora_alpha: int = Field(16, ge=1, description="scaling numerator (update scale = lora_alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (0 keeps runs deterministic)")
    target_modules: list[str] | str | None = Field(
        None, description="module names (or 'all-linear') to adapt; None: peft's default for the architecture")
    layers_to_transform: list[int] | None = Field(None, description="only adapt these layers (None: all layers)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train with the adapter")
    task_type: str | None = Field(None, description="peft task type (None: CAUSAL_LM for causal language models)")

    @model_validator(mode="after")
    def _known_fields(self) -> "LoraFields":
        known = {f.name for f in dataclasses.fields(peft.LoraConfig)} - _INTERNAL
        unknown = sorted(set(self.model_extra or {}) - known)
        if unknown:
            hint = "".join(f" ({k} is now {_RENAMED[k]})" for k in unknown if k in _RENAMED)
            raise ValueError(f"not a peft LoraConfig field: {', '.join(unknown)}{hint}")
        return self

    def to_peft(self, **overrides: Any) -> peft.LoraConfig:
        """``peft.LoraConfig(**fields, **overrides)``."""
        return peft.LoraConfig(**{**self.model_dump(), **overrides})


@dataclass
class Trainable:
    """A model ready for :func:`excise.train.train` and what to undo afterwards."""

    model: Any  # the model to train: a peft model for lora / masked_lora, the model itself for full
    method: str
    masked: MaskedLora | None = None  # method masked_lora: the adapter with its mask and proofs
    hooks: list[Any] = field(default_factory=list)  # gradient-mask hooks (method full with a mask)

    @property
    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters() if p.requires_grad))

    def release(self) -> None:
        """Remove the gradient-mask hooks (the trained weights stay)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.masked is not None:
            self.masked.remove_hooks()


def _task_type(model: Any, fields: LoraFields) -> str | None:
    if fields.task_type is not None:
        return fields.task_type
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def lora_model(model: Any, fields: LoraFields | None = None, *, seed: int = 0, **overrides: Any) -> Any:
    """Wrap ``model`` (in place) in a peft LoRA adapter built from ``fields``; base weights frozen."""
    fields = fields or LoraFields()
    torch.manual_seed(seed)  # the adapter init
    cfg = fields.to_peft(**{"task_type": _task_type(model, fields), **overrides})
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:
        raise ExciseError(f"cannot add LoRA: {str(e).splitlines()[0][:200]} (set lora.target_modules)") from None


def grad_mask_hooks(model: Any, grad_masks: dict[str, torch.Tensor]) -> list[Any]:
    """Freeze everything except the masked parameters, whose gradients are zeroed outside the mask."""
    params = dict(model.named_parameters())
    unknown = [k for k in grad_masks if k not in params]
    if unknown:
        raise ExciseError(f"grad mask names unknown parameters: {', '.join(unknown[:3])}")
    for name, p in params.items():
        p.requires_grad_(name in grad_masks)
    hooks = []
    for name, m in grad_masks.items():
        mask = m.to(device=params[name].device, dtype=params[name].dtype)
        if mask.shape != params[name].shape:
            raise ExciseError(f"grad mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}")
        hooks.append(params[name].register_hook(lambda g, mask=mask: g * mask))
    return hooks


def _masked_lora(model: Any, mask: Any, fields: LoraFields, seed: int) -> MaskedLora:
    if getattr(mask, "kind", None) not in ("neuron", "head"):
        raise ExciseError(f"masked LoRA acts on neuron or head masks, got '{getattr(mask, 'kind', type(mask).__name__)}'")
    if fields.target_modules is not None or fields.layers_to_transform is not None:
        raise ExciseError("masked LoRA chooses its modules and layers from the mask; leave lora.target_modules "
                          "and lora.layers_to_transform unset")
    an = Anatomy.of(model)
    layers = [l for l in range(mask.values.shape[0]) if bool(mask.values[l].any())]
    if not layers:
        raise ExciseError("the mask selects no unit: nothing to adapt")
    names = module_names(model, an, mask.kind, layers)
    col_masks = {n: column_mask(an, mask.kind, mask.values[l]).cpu() for n, l in names.items()}
    transposed = an.spec.mlp_down_transposed if mask.kind == "neuron" else an.spec.attn_out_transposed
    pm = lora_model(model, fields, seed=seed, target_modules=list(names), init_lora_weights=True,
                    fan_in_fan_out=bool(transposed), task_type=fields.task_type)
    return MaskedLora(pm, mask, col_masks, arm(pm, col_masks))


def make_trainable(model: Any, method: Literal["lora", "masked_lora", "full"] = "lora",
                   lora: LoraFields | None = None, *, mask: Any = None, seed: int = 0) -> Trainable:
    """Prepare ``model`` (modified in place) for training by one of the three methods (see the module doc).

    ``mask``: a neuron/head :class:`excise.select.Mask` for masked_lora; for full, an optional
    dict of parameter name -> 0/1 tensor (only those slices train). ``seed`` seeds the adapter init.
    """
    lora = lora or LoraFields()
    if method == "lora":
        if mask is not None:
            raise ExciseError("method lora takes no mask (use masked_lora, or full with gradient masks)")
        return Trainable(lora_model(model, lora, seed=seed), "lora")
    if method == "masked_lora":
        if mask is None:
            raise ExciseError("method masked_lora needs a unit mask")
        ml = _masked_lora(model, mask, lora, seed)
        return Trainable(ml.model, "masked_lora", masked=ml)
    if method == "full":
        if mask is None:
            for p in model.parameters():
                p.requires_grad_(True)
            return Trainable(model, "full")
        if not isinstance(mask, dict) or not mask:
            raise ExciseError("method full takes gradient masks: a non-empty dict of parameter name -> 0/1 tensor")
        return Trainable(model, "full", hooks=grad_mask_hooks(model, mask))
    raise ExciseError(f"unknown training method '{method}'; choose lora, masked_lora or full")
