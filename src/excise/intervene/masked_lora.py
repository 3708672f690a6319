"""Masked LoRA: a peft LoRA whose weight update reaches only the masked units.

A LoRA on a linear layer adds ``delta W = s * B @ A`` with ``A`` of shape [r, in_features]. The
inputs of the MLP down-projection are the MLP hidden units (neurons) and the inputs of the
attention output projection are the heads' outputs (``head_dim`` columns per head), so zeroing
the columns of ``A`` that belong to unselected units makes ``delta W`` exactly zero on them:
those units' contributions to the residual stream are bit-for-bit what the base model computes.
We zero those columns at creation and register a gradient hook that zeroes their gradients;
with AdamW (weight decay 0, or decoupled decay of a zero) and gradient clipping, a zero
gradient means a zero update, so the columns stay exactly zero during training. ``B`` starts at
zero (peft's default), so the adapter starts as the identity. Only layers with at least one
selected unit get an adapter at all.

Because the mask lives in the values of ``A`` (not in a wrapper), the adapter is a plain peft
adapter: ``save`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by
``PeftModel.from_pretrained`` without excise) and ``unit_mask.safetensors`` beside them; ``load``
re-checks that the saved ``A`` respects the mask and re-arms the hooks. peft's merge and unload
work unchanged. The adapter is built by :func:`excise.intervene.trainable.make_trainable`
(``method="masked_lora"``); :func:`all_units` gives the unmasked (plain LoRA) baseline's mask.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from excise import losses as U
from excise.errors import ExciseError
from excise.io import atomic_dir, atomic_write_bytes, canonical_safetensors
from excise.models.anatomy import Anatomy
from excise.select import Mask
from excise.tasks.concepts import encode_items
from excise.train import TrainConfig, train

MASK_FILE = "unit_mask.safetensors"


def target_module(anatomy: Any, kind: str, layer: int) -> Any:
    """The linear layer whose input columns are the units of ``kind`` at ``layer``."""
    if kind == "neuron":
        return anatomy.mlp_down(layer)
    if kind == "head":
        return anatomy.attn_out(layer)
    raise ExciseError(f"masked LoRA acts on neuron or head units, not '{kind}'")


def column_mask(anatomy: Any, kind: str, unit_mask_row: torch.Tensor) -> torch.Tensor:
    """Boolean mask over the input features of the target module for one layer."""
    row = unit_mask_row.bool()
    if kind == "head":
        return row.repeat_interleave(anatomy.head_dim)
    return row


def module_names(model: Any, anatomy: Any, kind: str, layers: list[int]) -> dict[str, int]:
    names = {}
    for l in layers:
        mod = target_module(anatomy, kind, l)
        for n, m in model.named_modules():
            if m is mod:
                names[n] = l
                break
    return names


def arm(peft_model: Any, col_masks: dict[str, torch.Tensor]) -> list[Any]:
    """Zero masked-out columns of every lora_A and zero their gradients from now on."""
    hooks = []
    found = set()
    for name, mod in peft_model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        if lora_A is None or not hasattr(lora_A, "keys"):
            continue
        key = next((k for k in col_masks if name == k or name.endswith("." + k)), None)
        if key is None:
            continue
        found.add(key)
        for adapter in lora_A.keys():
            w = lora_A[adapter].weight
            cm = col_masks[key].to(device=w.device)
            if cm.numel() != w.shape[1]:
                raise ExciseError(f"mask for {key} has {cm.numel()} columns, adapter A has {w.shape[1]}")
            keep = cm.to(w.dtype).view(1, -1)
            with torch.no_grad():
                w.mul_(keep)
            hooks.append(w.register_hook(lambda g, keep=keep: g * keep))
    missing = set(col_masks) - found
    if missing:
        raise ExciseError(f"masked LoRA: no adapter found on {', '.join(sorted(missing)[:3])}")
    return hooks


class MaskedLora:
    """A peft model whose LoRA update is confined to the units of a :class:`excise.select.Mask`."""

    def __init__(self, peft_model: Any, mask: Any, col_masks: dict[str, torch.Tensor], hooks: list[Any]):
        self.model = peft_model
        self.mask = mask
        self.col_masks = col_masks
        self._hooks = hooks

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_effective(self) -> int:
        """Trainable values that can actually move (A's unmasked columns + all of B)."""
        n = 0
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_A." in name:
                key = next(k for k in self.col_masks if k in name)
                n += int(self.col_masks[key].sum()) * p.shape[0]
            else:
                n += p.numel()
        return n

    def delta_outside_mask(self) -> float:
        """max |delta W| over the columns of unselected units (0.0 means they are untouched)."""
        worst = 0.0
        for name, mod in self.model.named_modules():
            key = next((k for k in self.col_masks if name == k or name.endswith("." + k)), None)
            if key is None or not hasattr(mod, "get_delta_weight"):
                continue
            for adapter in mod.lora_A.keys():
                dw = mod.get_delta_weight(adapter).detach()
                cols = dw if dw.shape[-1] == self.col_masks[key].numel() else dw.T  # Conv1D stores [in, out]
                off = ~self.col_masks[key].to(cols.device)
                if off.any():
                    worst = max(worst, float(cols[:, off].abs().max()))
        return worst

    def save(self, directory: str | Path) -> Path:
        """PEFT adapter files + ``unit_mask.safetensors`` (unit mask and per-module column masks), atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(str(tmp))
            tensors = {"units": self.mask.values.to(torch.uint8).contiguous()}
            tensors.update({f"columns::{k}": v.to(torch.uint8).contiguous() for k, v in self.col_masks.items()})
            atomic_write_bytes(tmp / MASK_FILE, canonical_safetensors(
                safetensors_bytes(tensors, metadata={"kind": self.mask.kind, "format": "excise.masked_lora/1"})))
        return directory

    def merge_and_unload(self) -> Any:
        """Bake the update into the base weights (peft) and return the plain model."""
        self.remove_hooks()
        return self.model.merge_and_unload()

    def unload(self) -> Any:
        """Remove the adapter and return the untouched base model (peft)."""
        self.remove_hooks()
        return self.model.unload()

    def remove_hooks(self) -> None:
        """Stop zeroing the masked-out gradients (after training; the adapter's values keep the mask)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def all_units(model: Any, kind: str) -> Any:
    """A mask selecting every unit of ``kind`` in every layer: the unmasked (plain LoRA) baseline."""
    an = Anatomy.of(model)
    width = an.d_mlp if kind == "neuron" else an.n_heads
    return Mask(kind, torch.ones(an.n_layers, width, dtype=torch.bool))


def load_masked_lora(model: Any, directory: str | Path, *, trainable: bool = False) -> MaskedLora:
    """Load a saved masked LoRA onto ``model``; refuses an adapter that writes outside its mask."""
    directory = Path(directory)
    mf = directory / MASK_FILE
    if not (directory / "adapter_config.json").exists() or not mf.exists():
        raise ExciseError(f"not a masked LoRA directory (needs adapter_config.json and {MASK_FILE})", where=str(directory))
    with safe_open(str(mf), framework="pt") as f:
        meta = f.metadata() or {}
        units = f.get_tensor("units").bool()
        col_masks = {k.split("::", 1)[1]: f.get_tensor(k).bool() for k in f.keys() if k.startswith("columns::")}
    peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    ml = MaskedLora(peft_model, Mask(meta.get("kind", "neuron"), units), col_masks, [])
    # verify before arming (arming would silently zero a violating adapter)
    for name, mod in peft_model.named_modules():
        key = next((k for k in col_masks if name == k or name.endswith("." + k)), None)
        if key is None or not hasattr(mod, "lora_A"):
            continue
        for adapter in mod.lora_A.keys():
            w = mod.lora_A[adapter].weight
            if w[:, ~col_masks[key].to(w.device)].abs().max() > 0 if (~col_masks[key]).any() else False:
                raise ExciseError(f"adapter in {directory} updates units outside its mask (module {key})")
    if trainable:
        ml._hooks = arm(peft_model, col_masks)
    return ml


def adapter_summary(directory: str | Path) -> dict:
    cfg = json.loads((Path(directory) / "adapter_config.json").read_text())
    return {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "target_modules": sorted(cfg.get("target_modules") or [])}


# --- concept unlearning objectives ---------------------------------------------------------

class UnlearnSettings(TrainConfig):
    """One unlearning run on a concept spec (forget items + retain items); loop settings from :class:`TrainConfig`."""

    model_config = {"extra": "forbid"}
    objective: Literal["grad_ascent", "idk", "npo"] = Field(
        "npo", description="grad_ascent: raise the NLL of the revealing answer; idk: replace it by the spec's refusal; "
                           "npo: negative preference optimisation against the frozen base (Zhang et al., 2024)")
    steps: int = Field(15, ge=1, description="optimizer steps (equal across compared methods)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (LoRA scale; full fine-tuning needs ~50x less)")
    batch_size: int = Field(4, ge=1, description="forget items per step (and as many retain items)")
    retain_weight: float = Field(5.0, ge=0, description="weight of the retain term KL(p_base || p) on retain prompts")
    retain_on: Literal["response", "all"] = Field(
        "response", description="positions the retain KL averages over: those predicting the response tokens (where "
                                "the facts are), or every real token (dominated by the shared chat template)")
    npo_beta: float = Field(0.1, gt=0, description="NPO inverse temperature (Zhang et al., 2024)")


def _chunks(items: list, size: int, seed: int) -> list[list]:
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[s:s + size] for s in range(0, len(order), size)]


def concept_batches(handle: Any, spec: Any, cfg: UnlearnSettings, model: Any = None) -> list[dict]:
    """Fixed forget/retain batches with the frozen model's logits precomputed (the reference for NPO and KL).

    ``model`` must be the unmodified model (adapters not yet trained: B = 0 gives the base outputs).
    """
    model = model if model is not None else handle.model
    f_chunks = _chunks(list(spec.forget), cfg.batch_size, cfg.seed)
    r_chunks = _chunks(list(spec.retain_train or spec.retain), cfg.batch_size, cfg.seed + 1)
    n = max(len(f_chunks), len(r_chunks))
    out = []
    was_training = model.training
    model.eval()
    for i in range(n):
        fc, rc = f_chunks[i % len(f_chunks)], r_chunks[i % len(r_chunks)]
        responses = [spec.refusal] * len(fc) if cfg.objective == "idk" else None
        fb = encode_items(handle, fc, responses)
        rb = encode_items(handle, rc)
        with torch.inference_mode():
            f_ref = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits if cfg.objective == "npo" else None
            r_ref = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits if cfg.retain_weight > 0 else None
        b = dict(fb)
        if f_ref is not None:
            b["ref_logits"] = f_ref.clone()
        b.update({f"retain_{k}": v for k, v in rb.items()})
        if r_ref is not None:
            b["retain_ref_logits"] = r_ref.clone()
        out.append(b)
    if was_training:
        model.train()
    return out


def concept_loss(model: Any, batch: dict, cfg: UnlearnSettings) -> torch.Tensor:
    """Forget objective + retain_weight * KL(p_ref || p) on retain prompts (shared losses, excise.losses)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if cfg.objective == "grad_ascent":
        loss = U.grad_ascent(logits, batch["labels"])
    elif cfg.objective == "idk":
        loss = U.nll(logits, batch["labels"])
    else:
        loss = U.npo(logits, batch["ref_logits"], batch["labels"], beta=cfg.npo_beta)
    if cfg.retain_weight > 0:
        r_logits = model(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"]).logits
        if cfg.retain_on == "response":
            pos = torch.zeros_like(batch["retain_attention_mask"])
            pos[:, :-1] = (batch["retain_labels"][:, 1:] != -100).long()  # logits at t predict token t+1
        else:
            pos = batch["retain_attention_mask"]
        loss = loss + cfg.retain_weight * U.kl_to_ref(r_logits, batch["retain_ref_logits"], pos)
    return loss


def unlearn_concept(handle: Any, model: Any, spec: Any, cfg: UnlearnSettings | None = None, *,
                    progress: bool = False, batches: list[dict] | None = None,
                    checkpoint_dir: str | Path | None = None) -> list[dict]:
    """Train ``model``'s trainable parameters (a LoRA, a masked LoRA, or all weights) to forget the concept.

    Goes through :func:`excise.train.train` (accelerate), cycling the fixed batches. Returns the per-step log.
    """
    cfg = cfg or UnlearnSettings()
    batches = batches if batches is not None else concept_batches(handle, spec, cfg, model)
    res = train(model, lambda step: batches[step % len(batches)], lambda m, b: concept_loss(m, b, cfg), cfg,
                checkpoint_dir=checkpoint_dir, progress=progress, desc=f"unlearn[{cfg.objective}]")
    return res.log
