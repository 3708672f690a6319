"""UNDO: Unlearn, Noise, Distill on Outputs (Lee et al., 2025, arXiv 2506.06278).

Why: output-level unlearning only suppresses a skill, so a few fine-tuning steps bring it
back. Noising the unlearned weights destroys the latent skill; distilling the unlearned
teacher's *outputs* back into the noised copy restores only what the teacher still shows.

* global noise: ``theta <- (1 - alpha) * theta + alpha * beta * N`` with N Xavier-uniform for
  matrices; vectors (norm scales, biases) only shrink (N = 0);
* targeted noise with a mask m (1 = noise this parameter, fractional values allowed for
  relative masks): ``theta <- (1 - alpha * m) * theta + alpha * m * beta * N``; parameters the
  mask does not name keep m = 0;
* distillation: forward KL(teacher || student) on all tokens of the mixed data, stopped early
  once retain accuracy (on the early-stop pool, never the test pool) is within ``tolerance``
  (0.05) of the teacher's; the learning rate follows the reference's cosine from 7e-4 down to
  7e-5 over the step budget.

Defaults: beta = 0.1 as in the reference code's runs; alpha is the compute/robustness knob.
Distillation's batch is 128 sequences (the reference's are far larger; 128 costs 0.16 CPU s a
step on the 2-layer arithmetic model, one thread, so 200 steps take about half a CPU minute).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.intervene.base import INTERVENTIONS, check_mask, result_handle
from excise.lm import lm_batch
from excise.locate.base import LocateData
from excise.losses import kl_to_ref
from excise.train import TrainConfig, train
from excise.units import unit_param_masks
from excise.registry import Configured


class NoiseConfig(BaseModel):
    """Noise applied to the unlearned model before distillation."""

    model_config = {"extra": "forbid"}
    alpha: float = Field(0.5, ge=0, le=1, description="interpolation toward noise (0: untouched, 1: fully re-initialised)")
    beta: float = Field(0.1, ge=0, description="scale of the Xavier-uniform noise N")
    seed: int = Field(0, description="seed of the noise draw")


def xavier_noise(shape: Sequence[int], generator: Any) -> Any:
    """Xavier-uniform sample: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (torch's fan convention)."""
    t = torch.empty(*shape)
    fan_out, fan_in = shape[0], int(math.prod(shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return t.uniform_(-bound, bound, generator=generator)


def apply_noise(model: Any, cfg: NoiseConfig, mask: Mapping[str, Any] | None = None) -> dict:
    """Noise ``model`` in place (global when ``mask`` is None). Returns what was touched.

    ``mask`` maps parameter names (``model.named_parameters()``) to tensors of the parameter's
    shape with values in [0, 1]. Noise draws use one seeded CPU generator in parameter order,
    so the same seed gives the same noise whatever the mask.
    """
    if mask is not None:
        names = dict(model.named_parameters())
        for k, m in mask.items():
            if k not in names:
                raise ExciseError(f"noise mask names unknown parameter '{k}'")
            if tuple(m.shape) != tuple(names[k].shape):
                raise ExciseError(f"noise mask for '{k}' has shape {tuple(m.shape)}, parameter has {tuple(names[k].shape)}")
            if float(m.min()) < 0 or float(m.max()) > 1:
                raise ExciseError(f"noise mask for '{k}' has values outside [0, 1]")
    g = torch.Generator().manual_seed(cfg.seed)
    total = touched = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            total += p.numel()
            noise = xavier_noise(p.shape, g).to(p.device, p.dtype) if p.dim() >= 2 else None
            if mask is None:
                m = None
            elif name in mask:
                m = mask[name].to(p.device, p.dtype)
            else:
                continue
            am = cfg.alpha if m is None else cfg.alpha * m
            if noise is None:
                p.mul_(1 - am)
            else:
                p.mul_(1 - am).add_(am * cfg.beta * noise)
            touched += p.numel() if m is None else float(m.sum())
    return {"alpha": cfg.alpha, "beta": cfg.beta, "masked": mask is not None,
            "noised_fraction": touched / max(total, 1.0), "n_params": int(total)}


class DistillConfig(BaseModel):
    """Distillation of the unlearned teacher into the noised student."""

    model_config = {"extra": "forbid"}
    max_steps: int = Field(200, ge=0, description="step budget; distillation stops earlier once retain accuracy recovers")
    lr: float = Field(7e-4, gt=0, description="AdamW peak learning rate (the reference's 7e-4)")
    min_lr: float = Field(7e-5, ge=0, description="learning rate the cosine ends at after max_steps (the reference's 7e-5)")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="after warm-up: cosine from lr to min_lr, or constant lr")
    warmup: int = Field(10, ge=0, description="linear warm-up steps")
    batch_size: int = Field(128, ge=1, description="sequences of the mixed data per step (CPU-bound choice; see module doc)")
    eval_every: int = Field(20, ge=1, description="check retain (and forget) accuracy every this many steps")
    tolerance: float = Field(0.05, ge=0, le=1, description="stop when retain accuracy >= teacher's - tolerance")
    eval_n_per_op: int = Field(50, ge=1, description="early-stop-pool items per operation for the checks")
    seed: int = Field(0, description="seed of data order")


def distill(student: Any, teacher: Any, tokenizer: Any, data: Iterator[Any], cfg: DistillConfig, *,
            retain_check: Callable[[Any], float] | None = None, teacher_retain: float | None = None,
            forget_check: Callable[[Any], float] | None = None, progress: bool = False,
            checkpoint_dir: str | Path | None = None, at_steps: Mapping[int, Callable[[Any, int], None]] | None = None) -> dict:
    """Distill ``teacher`` into ``student`` (in place) on an endless stream of mixed items.

    ``retain_check(model) -> accuracy`` drives early stopping against ``teacher_retain``;
    ``forget_check`` (optional) only records forget accuracy on the curve. Returns steps, tokens,
    estimated FLOPs (6 * params * tokens, student training only), whether the retain target was
    reached, and the curve: step 0 and every ``eval_every`` steps, the mean KL since the last
    point (``loss``), retain and forget accuracy. ``at_steps[k](model, tokens)`` runs after step ``k`` with the
    real tokens trained on so far (the compute sweep's checkpoints; the model is in eval mode then).
    """
    if (retain_check is None) != (teacher_retain is None):
        raise ExciseError("distill: give both retain_check and teacher_retain, or neither")
    torch.manual_seed(cfg.seed)
    teacher.eval()  # the teacher runs under no_grad; its parameters are left as they are
    for p in student.parameters():  # a student copied from a frozen model must train
        p.requires_grad_(True)

    def batches():
        while True:
            yield lm_batch(tokenizer, [next(data).text for _ in range(cfg.batch_size)])

    losses: list[float] = []  # KL of the steps since the last curve point
    seen = {"tokens": 0}  # real tokens of this process's batches so far
    curve: list[dict] = []

    def loss_fn(m, b):
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        seen["tokens"] += int(b["attention_mask"].sum())
        loss = kl_to_ref(s, t, b["attention_mask"])
        losses.append(float(loss.detach()))
        return loss

    def point(step: int, m: Any) -> dict:
        pt: dict = {"step": step, "loss": sum(losses) / len(losses) if losses else None}
        losses.clear()
        if retain_check is not None:
            pt["retain"] = retain_check(m)
        if forget_check is not None:
            pt["forget"] = forget_check(m)
        curve.append(pt)
        return pt

    state = {"reached": False}
    if retain_check is not None or forget_check is not None:
        pt = point(0, student)
        state["reached"] = retain_check is not None and pt["retain"] >= teacher_retain - cfg.tolerance

    def on_step(step: int, m: Any) -> bool:
        if at_steps and step in at_steps:
            was = m.training
            m.eval()
            at_steps[step](m, seen["tokens"])
            m.train(was)
        if step % cfg.eval_every or (retain_check is None and forget_check is None):
            return False
        pt = point(step, m)
        state["reached"] = retain_check is not None and pt["retain"] >= teacher_retain - cfg.tolerance
        return state["reached"]

    log: list[dict] = []
    if not state["reached"] and cfg.max_steps:
        tcfg = TrainConfig(steps=cfg.max_steps, lr=cfg.lr, warmup_steps=cfg.warmup, batch_size=cfg.batch_size,
                           schedule=cfg.schedule, min_lr=cfg.min_lr if cfg.schedule == "cosine" else 0.0,
                           seed=cfg.seed)
        log = train(student, batches(), loss_fn, tcfg, checkpoint_dir=checkpoint_dir, progress=progress, desc="distill",
                    on_step=on_step).log
    n_params = sum(p.numel() for p in student.parameters())
    tokens = sum(r["tokens"] for r in log)
    return {"steps": len(log), "tokens": tokens, "flops": 6.0 * n_params * tokens, "reached": state["reached"],
            "final_kl": log[-1]["loss"] if log else float("nan"), "curve": curve,
            "seconds": log[-1]["seconds"] if log else 0.0}


class UndoConfig(NoiseConfig):
    """UNDO as a registered intervention: noise (masked by the selected units, or global), then distill."""

    distill_steps: int = Field(0, ge=0, description="steps distilling the original model into the noised copy on the "
                                                  "retain examples (0: noise only, which keeps the change inside the mask)")
    distill_lr: float = Field(2e-3, gt=0, description="distillation learning rate")
    distill_batch_size: int = Field(8, ge=1, description="retain examples per distillation step")


@INTERVENTIONS.register
class Undo(Configured):
    """Noise the selected heads' or neurons' weights (all weights without a mask), optionally distil back."""

    name = "noise"
    Config = UndoConfig
    accepts = ("neuron", "head", None)

    def __init__(self, config: UndoConfig):
        super().__init__(config)
        self.masked = config.distill_steps == 0  # distillation changes every weight

    def apply(self, handle: Any, mask: Any, data: LocateData) -> Any:
        check_mask(self, mask)
        c = self.config
        student = copy.deepcopy(handle.model)
        pmask = None if mask is None else unit_param_masks(handle.anatomy, mask.kind, mask.values)
        info = apply_noise(student, NoiseConfig(alpha=c.alpha, beta=c.beta, seed=c.seed), pmask)
        if c.distill_steps:
            data.require(("retain",), self.name)
            cfg = DistillConfig(max_steps=c.distill_steps, lr=c.distill_lr, warmup=0,
                                batch_size=c.distill_batch_size, seed=c.seed)
            info["distill"] = distill(student, handle.model, handle.tokenizer, itertools.cycle(list(data.retain)), cfg)
        return result_handle(handle, student, noise=info)
