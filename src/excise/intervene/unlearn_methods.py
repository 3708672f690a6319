"""Unlearning training loops (GradAscent, GradDiff, MaxEnt, NPO, RMU) on the shared losses.

The losses live in :mod:`excise.losses`; this module only feeds them batches; the
optimizer steps in :func:`excise.train.train` (accelerate), the loop every trainer shares.

Defaults per method (documented in :class:`UnlearnConfig`) follow the sources named in
:mod:`excise.losses`, scaled to the step counts a small model needs: GradAscent has
no retain term (it is the naive baseline); GradDiff, MaxEnt and NPO add the retain NLL with
weight 1 (TOFU / the UNDO paper's MaxEnt); RMU steers one middle layer's residual stream on
forget tokens to ``c * u`` and keeps retain activations with weight ``alpha`` = 100 (WMDP),
updating only the MLPs of the layers ending there (WMDP's choice).

RMU's scale: WMDP's c = 6.5 was set for Zephyr-7B's residual norms; a fixed c means nothing on
another model. Unless ``rmu_c`` is given, c = ``rmu_c_factor`` x the mean residual norm at the
steered layer on the steered forget positions, measured on the unlearning's first forget batch
before any step (the idea of Adaptive RMU, Dang et al., 2025: scale the target with the
activations it replaces). With ``loss_on: answer`` RMU steers only the positions that predict
answer tokens (the last prompt token and the answer tokens but the last), so it does not fight
the retain term on the word-problem templates forget and retain items share.
"""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from excise import losses as L
from excise.errors import ExciseError
from excise.intervene.base import INTERVENTIONS, check_mask, result_handle
from excise.intervene.trainable import make_trainable
from excise.lm import lm_batch
from excise.locate.base import LocateData
from excise.models.anatomy import Anatomy
from excise.trace import Trace
from excise.train import TrainConfig, train
from excise.units import unit_param_masks
from excise.registry import Configured

METHODS = ("grad_ascent", "grad_diff", "maxent", "npo", "rmu")


# --- unlearning ---------------------------------------------------------------------------

class UnlearnConfig(BaseModel):
    """One unlearning run. Defaults reproduce each method's source where it has one (see module doc)."""

    model_config = {"extra": "forbid"}
    method: Literal["grad_ascent", "grad_diff", "maxent", "npo", "rmu"] = Field(
        "maxent", description="unlearning objective (losses from excise.losses)")
    steps: int = Field(80, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant after warm-up)")
    warmup: int = Field(0, ge=0, description="linear warm-up steps")
    batch_size: int = Field(32, ge=1, description="forget sequences per step (and as many retain sequences)")
    retain_weight: float = Field(1.0, ge=0, description="weight of the retain NLL (GradDiff, MaxEnt, NPO)")
    npo_beta: float = Field(0.1, gt=0, description="NPO inverse temperature beta (Zhang et al., 2024)")
    rmu_layer: int | None = Field(None, description="RMU steering layer (None: the middle layer)")
    rmu_c: float | None = Field(None, gt=0, description="RMU control-vector scale c (WMDP: 6.5 for Zephyr-7B); None: "
                                                      "rmu_c_factor x the measured residual norm")
    rmu_c_factor: float = Field(5.0, gt=0, description="c as a multiple of the mean residual norm at the steered layer "
                                                       "on the steered forget positions (measured before training)")
    rmu_alpha: float = Field(100.0, ge=0, description="RMU retain-activation weight alpha (WMDP)")
    rmu_n_layers_updated: int = Field(3, ge=1, description="RMU updates the MLPs of this many layers ending at rmu_layer (WMDP: 3)")
    loss_on: Literal["all", "answer"] = Field("all", description="tokens the forget/retain losses count: all, or only the answer")
    seed: int = Field(0, description="seed of data order and of RMU's random direction")


def _batch(tokenizer: Any, items: Sequence[Any], loss_on: str, max_length: int | None = None) -> dict:
    return lm_batch(tokenizer, [it.text for it in items], max_length=max_length,
                    prompts=[it.prompt for it in items] if loss_on == "answer" else None)


def pair_batches(tokenizer: Any, forget: Iterator[Any], retain: Iterator[Any] | None, batch_size: int,
                 loss_on: str = "all", max_length: int | None = None) -> Iterator[dict]:
    """Endless batches: forget tensors under the usual keys, retain tensors prefixed ``retain_``."""
    while True:
        b = _batch(tokenizer, [next(forget) for _ in range(batch_size)], loss_on, max_length)
        if retain is not None:
            r = _batch(tokenizer, [next(retain) for _ in range(batch_size)], loss_on, max_length)
            b.update({f"retain_{k}": v for k, v in r.items()})
        yield b


def cycle(items: Sequence[Any], seed: int) -> Iterator[Any]:
    """Endless shuffled passes over a finite list (a user's data file)."""
    if not items:
        raise ExciseError("empty item list")
    rng = random.Random(seed)
    order = list(items)
    while True:
        rng.shuffle(order)
        yield from order


def _middle_layer(model: Any) -> int:
    return Anatomy.of(model).n_layers // 2


def rmu_positions(batch: dict, loss_on: str) -> torch.Tensor:
    """The forget positions RMU steers: every real token, or (answer) those whose next token is an answer token."""
    if loss_on != "answer":
        return batch["attention_mask"]
    nxt = batch["labels"][:, 1:] != L.IGNORE  # position t predicts token t + 1
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], 1).to(batch["attention_mask"].dtype)


def unlearn(model: Any, tokenizer: Any, forget: Iterator[Any], retain: Iterator[Any] | None, cfg: UnlearnConfig,
            *, progress: bool = False, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
            info: dict | None = None) -> list[dict]:
    """Unlearn in place; ``forget``/``retain`` are endless item streams (objects with ``prompt`` and ``text``).

    Trains through :func:`excise.train.train`; returns its per-step log (step, loss, lr, tokens, seconds).
    With ``checkpoint_dir`` and ``checkpoint_every`` a killed run resumes from its last checkpoint.
    ``info`` (a dict, optional) receives what was measured before training: RMU's residual norm and c.
    """
    torch.manual_seed(cfg.seed)
    needs_retain = cfg.method != "grad_ascent"
    if needs_retain and retain is None:
        raise ExciseError(f"unlearning method '{cfg.method}' needs retain data")
    batches = pair_batches(tokenizer, forget, retain if needs_retain else None, cfg.batch_size, cfg.loss_on)
    params = None
    frozen = None
    if cfg.method in ("npo", "rmu"):
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)

    def retain_nll(m, b):
        out = m(input_ids=b["retain_input_ids"], attention_mask=b["retain_attention_mask"])
        return L.nll(out.logits, b["retain_labels"])

    if cfg.method == "grad_ascent":
        def loss_fn(m, b):
            return L.grad_ascent(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    elif cfg.method == "grad_diff":
        def loss_fn(m, b):
            f = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            r = m(input_ids=b["retain_input_ids"], attention_mask=b["retain_attention_mask"]).logits
            return L.grad_diff(f, b["labels"], r, b["retain_labels"], retain_weight=cfg.retain_weight)
    elif cfg.method == "maxent":
        def loss_fn(m, b):
            f = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return L.maxent(f, b["labels"]) + cfg.retain_weight * retain_nll(m, b)
    elif cfg.method == "npo":
        def loss_fn(m, b):
            f = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            with torch.no_grad():
                ref = frozen(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return L.npo(f, ref, b["labels"], beta=cfg.npo_beta) + cfg.retain_weight * retain_nll(m, b)
    else:  # rmu
        an = Anatomy.of(model)
        layer = cfg.rmu_layer if cfg.rmu_layer is not None else _middle_layer(model)
        if not 0 <= layer < an.n_layers:
            raise ExciseError(f"rmu_layer {layer} out of range 0..{an.n_layers - 1}", where="unlearn:rmu_layer")
        g = torch.Generator().manual_seed(cfg.seed)
        u = torch.rand(an.d_model, generator=g)
        first = max(0, layer - cfg.rmu_n_layers_updated + 1)
        params = [p for l in range(first, layer + 1) for p in an.mlp(l).parameters()]
        site = f"resid.{layer}"
        b0 = next(batches)
        batches = itertools.chain([b0], batches)  # the measured batch is also the first step's
        device = next(model.parameters()).device
        with torch.no_grad(), Trace(frozen, [site]) as tf:
            frozen(input_ids=b0["input_ids"].to(device), attention_mask=b0["attention_mask"].to(device))
            pos = rmu_positions(b0, cfg.loss_on).to(device).bool()
            if not pos.any():
                raise ExciseError("RMU: the first forget batch has no position to steer (empty answers?)")
            norm = float(tf.cache[site].float().norm(dim=-1)[pos].mean())
        c = cfg.rmu_c if cfg.rmu_c is not None else cfg.rmu_c_factor * norm
        if info is not None:
            info.update({"rmu_layer": layer, "rmu_resid_norm": norm, "rmu_c": c,
                         "rmu_c_rule": "given" if cfg.rmu_c is not None else f"{cfg.rmu_c_factor:g} x norm"})
        control = (c * u / u.norm()).to(device)

        def loss_fn(m, b):
            with Trace(m, [site], detach=False) as tr:
                m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                fa = tr.cache[site]
                m(input_ids=b["retain_input_ids"], attention_mask=b["retain_attention_mask"])
                ra = tr.cache[site]
            with torch.no_grad(), Trace(frozen, [site]) as tf:
                frozen(input_ids=b["retain_input_ids"], attention_mask=b["retain_attention_mask"])
                fra = tf.cache[site]
            return L.rmu(fa, ra, fra, control, alpha=cfg.rmu_alpha, forget_mask=rmu_positions(b, cfg.loss_on),
                         retain_mask=b["retain_attention_mask"])

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup, batch_size=cfg.batch_size, seed=cfg.seed,
                       checkpoint_every=checkpoint_every if checkpoint_dir is not None else 0)
    return train(model, batches, loss_fn, tcfg, params=params, checkpoint_dir=checkpoint_dir, progress=progress,
                 desc=f"unlearn {cfg.method}").log


class UnlearnInterventionConfig(UnlearnConfig):
    """An unlearning objective trained on all weights, or only on the selected units' weight slices."""

    loss_on: Literal["all", "answer"] = Field("answer", description="tokens the losses count: all, or the response")


@INTERVENTIONS.register
class Unlearn(Configured):
    """Fine-tune a copy with an unlearning objective; a head/neuron mask confines the gradient to those units."""

    name = "unlearn"
    Config = UnlearnInterventionConfig
    accepts = ("neuron", "head", None)
    masked = True

    def apply(self, handle: Any, mask: Any, data: LocateData) -> Any:
        check_mask(self, mask)
        c = self.config
        if c.method == "rmu" and mask is not None:
            raise ExciseError("unlearning method 'rmu' chooses its own layers; use it without a mask")
        data.require(("forget",) if c.method == "grad_ascent" else ("forget", "retain"), self.name)
        model = copy.deepcopy(handle.model)
        grad_masks = None if mask is None else unit_param_masks(handle.anatomy, mask.kind, mask.values)
        tr = make_trainable(model, "full", mask=grad_masks)
        try:
            log = unlearn(model, handle.tokenizer, cycle(list(data.forget), c.seed),
                          cycle(list(data.retain), c.seed + 1) if data.retain else None, c)
        finally:
            tr.release()
        return result_handle(handle, model, train_log=log)
