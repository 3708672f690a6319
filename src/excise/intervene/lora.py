"""Fine-tuning through ``accelerate``: LoRA (peft) by default, full or gradient-masked optional.

One loop serves three uses: restoring accuracy after head pruning (LoRA on top of reversible
head scales), full fine-tuning, and *masked* fine-tuning that may only change chosen parameter
slices (how the planted-bias model is built). The model is made trainable by
:func:`excise.intervene.trainable.make_trainable` and trained by :func:`excise.train.train`
(accelerate): the global batch is split across processes and the loss is a mean over examples,
so 1 and N processes compute the same update.

The objective is multiple choice: each example is a prompt, its options and a target option;
the loss is cross-entropy over the options' summed log-likelihoods (``choice``) or the
next-token loss of the target option alone (``lm``). The prompt's forward pass is shared by its
options through the key/value cache, so scoring three options costs little more than one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from peft import PeftModel
from pydantic import Field

from excise.errors import ExciseError
from excise.intervene.heads import HeadScales, scale_heads
from excise.intervene.trainable import LoraFields, make_trainable
from excise.io import atomic_dir, atomic_write_json, read_json
from excise.lm import choice_logprobs
from excise.models import load
from excise.train import Examples, TrainConfig, train


@dataclass(frozen=True)
class ChoiceExample:
    """A prompt, its answer options (continuations) and the index of the option to train towards."""

    prompt: str
    options: tuple[str, ...]
    target: int


class FinetuneConfig(TrainConfig):
    """Settings of one fine-tuning run: the loop's (:class:`excise.train.TrainConfig`) plus the method and objective."""

    model_config = {"extra": "forbid"}
    method: Literal["lora", "full", "masked"] = Field(
        "lora", description="lora: peft adapter, base frozen; full: every weight; masked: only given parameter slices")
    objective: Literal["choice", "lm"] = Field(
        "choice", description="choice: cross-entropy over option log-likelihoods; lm: next-token loss of the target option")
    length_norm: bool = Field(False, description="average (not sum) option log-probs over option tokens")
    lora: LoraFields = Field(default_factory=LoraFields, description="adapter settings, peft LoraConfig fields (method=lora)")


# --- the choice objective ---------------------------------------------------------------------

def choice_loss(handle: Any, batch: Sequence[ChoiceExample], objective: str = "choice", *, model: Any = None,
                length_norm: bool = False) -> torch.Tensor:
    """Mean over examples of the per-example loss (so DDP's gradient average equals one process)."""
    if objective == "choice":
        lp = choice_logprobs(handle, [b.prompt for b in batch], [b.options for b in batch], model=model,
                             length_norm=length_norm)
        tgt = torch.tensor([b.target for b in batch], device=lp.device)
        return torch.nn.functional.cross_entropy(lp, tgt)
    # lm: next-token loss of the target option only, averaged over its tokens, then over examples
    lp = choice_logprobs(handle, [b.prompt for b in batch], [(b.options[b.target],) for b in batch], model=model,
                         length_norm=True)
    return -lp.mean()


# --- the training loop -------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    model: Any  # the trained model (a peft model for method=lora), unwrapped
    losses: list[float]
    seconds: float
    n_trainable: int
    n_processes: int

    def summary(self) -> dict:
        return {"losses": [round(x, 5) for x in self.losses], "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "seconds": round(self.seconds, 2), "n_trainable": self.n_trainable, "n_processes": self.n_processes}


def finetune(handle: Any, examples: Sequence[ChoiceExample], cfg: FinetuneConfig | None = None, *,
             head_scales: Any = None, grad_masks: dict[str, torch.Tensor] | None = None,
             accelerator: Any = None, progress: bool = False, checkpoint_dir: str | Path | None = None,
             on_step: Callable[[int, Any], bool] | None = None) -> FinetuneResult:
    """Fine-tune ``handle.model`` in place (lora: wrapped in an adapter, stored back in ``handle.model``).

    The model is made trainable by :func:`excise.intervene.trainable.make_trainable` and trained
    by :func:`excise.train.train` on the examples (``cfg.batch_size`` per step, seeded order).
    ``head_scales`` (``excise.intervene.heads.HeadScales``) stay attached as a reversible hook
    during training, so the adapter learns on top of the soft-pruned model. ``grad_masks``
    (method=masked) maps parameter names to 0/1 masks of the parameter's shape. ``checkpoint_dir``
    and ``on_step(step, model) -> stop`` go to :func:`excise.train.train` (checkpoints, resume, early stop).
    """
    cfg = cfg or FinetuneConfig()
    if not examples:
        raise ExciseError("fine-tuning needs at least one example")
    if cfg.method == "masked" and not grad_masks:
        raise ExciseError("method 'masked' needs grad_masks")
    t = make_trainable(handle.model, "lora" if cfg.method == "lora" else "full", cfg.lora,
                       mask=grad_masks if cfg.method == "masked" else None, seed=cfg.seed)
    handle.model = t.model
    scaler = scale_heads(handle, head_scales) if head_scales is not None else None

    def loss_fn(model: Any, batch: list[ChoiceExample]) -> torch.Tensor:
        return choice_loss(handle, batch, cfg.objective, model=model, length_norm=cfg.length_norm)

    try:
        res = train(t.model, Examples(examples, cfg.batch_size, seed=cfg.seed), loss_fn, cfg, accelerator=accelerator,
                    checkpoint_dir=checkpoint_dir, on_step=on_step, progress=progress, desc=f"finetune ({cfg.method})")
    finally:
        if scaler is not None:
            scaler.remove()
        t.release()
    model = res.model
    for p in model.parameters():
        p.requires_grad_(False)
    handle.model = model
    return FinetuneResult(model=model, losses=res.losses, seconds=res.seconds, n_trainable=res.n_trainable,
                          n_processes=res.n_processes)


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights under their plain names, also when wrapped by peft (adapter weights left out)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k}


# --- saving and reloading a mitigated model ------------------------------------------------------

MITIGATION_FILE = "mitigation.json"


def save_mitigated(handle: Any, directory: str | Path, *, head_scales: Any = None, base: str | None = None,
                   meta: dict | None = None) -> Path:
    """Save what a mitigation changed: head scales + the peft adapter (or full weights), atomically.

    The base model is referenced by name (``base``, default the handle's name), not copied, for
    adapters; a full fine-tune saves the whole model as safetensors.
    """
    directory = Path(directory)
    is_peft = hasattr(handle.model, "peft_config")
    with atomic_dir(directory) as tmp:
        if is_peft:
            handle.model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        else:
            handle.model.save_pretrained(str(tmp / "model"), safe_serialization=True)
            handle.tokenizer.save_pretrained(str(tmp / "model"))
        if head_scales is not None:
            head_scales.save(tmp)
        atomic_write_json(tmp / MITIGATION_FILE, {
            "format": "excise.mitigated/1", "base": base or handle.name, "adapter": is_peft,
            "head_scales": head_scales is not None, **(meta or {})})
    return directory


def load_mitigated(directory: str | Path, *, device: str = "cpu", dtype: str = "float32", merge: bool = False,
                   attn_implementation: str | None = None, base_handle: Any = None) -> Any:
    """Reload a mitigated model in one call: base + adapter (+ head scales as a reversible hook).

    Returns a ModelHandle; its ``extra`` holds ``head_scales`` and the attached hook. ``merge``
    folds the adapter into the weights (same outputs, no peft at inference). ``base_handle``
    supplies an already-loaded base model (e.g. an in-memory one) instead of loading ``base``.
    """
    directory = Path(directory)
    info_path = directory / MITIGATION_FILE
    if not info_path.exists():
        raise ExciseError(f"not a mitigated-model directory (no {MITIGATION_FILE})", where=str(directory))
    info = read_json(info_path)
    if info.get("format") != "excise.mitigated/1":
        raise ExciseError("unknown format", where=f"{info_path}:format")
    if info.get("adapter"):
        handle = base_handle or load(info["base"], device=device, dtype=dtype, attn_implementation=attn_implementation)
        handle.model = PeftModel.from_pretrained(handle.model, str(directory / "adapter"))
        if merge:
            handle.model = handle.model.merge_and_unload()
        handle.model.eval()
    else:
        handle = load(str(directory / "model"), device=device, dtype=dtype, attn_implementation=attn_implementation)
    handle.name = info.get("name", f"{info['base']}+mitigated")
    if info.get("head_scales"):
        hs = HeadScales.load(directory)
        handle.extra["head_scales"] = hs
        handle.extra["head_hook"] = scale_heads(handle, hs)
    handle.extra["mitigation"] = info
    return handle


def adapter_config_json(directory: str | Path) -> dict:
    """The saved peft adapter config (for reports)."""
    p = Path(directory) / "adapter" / "adapter_config.json"
    return json.loads(p.read_text()) if p.exists() else {}
