"""Relearning attack: fine-tune the unlearned model on the forget data and count the steps until the concept returns.

Why: unlearning that only hides knowledge comes back after a few gradient steps on the very
facts that were removed (Lynch et al., 2024; Deeb & Roger, 2024); the number of steps it takes
is a robustness measure. Generic: any model, any batches, any scalar check; the model is made
trainable by :func:`excise.intervene.trainable.make_trainable` and trained by
:func:`excise.train.train` (accelerate). Full fine-tuning by default (the attacker holds the
weights): pass a merged copy of an adapter model. ``lrs`` adds learning rates to ``lr``: each runs
on its own copy of the model and the worst case (the fastest return) is reported.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, Field

from excise.intervene.trainable import LoraFields, make_trainable
from excise.losses import nll
from excise.train import TrainConfig, train


class RelearnConfig(BaseModel):
    """Settings of the relearning check."""

    model_config = {"extra": "forbid"}
    steps: int = Field(6, ge=1, description="maximum fine-tuning steps on the forget data")
    lr: float = Field(3e-5, gt=0, description="AdamW learning rate (full fine-tuning)")
    lrs: list[float] = Field(default_factory=list, description="more learning rates tried besides lr, each on a fresh "
                                                            "copy of the model; the worst case (fastest return) is reported")
    eval_every: int = Field(3, ge=1, description="run the check every this many steps")
    threshold: float = Field(0.5, ge=0, le=1, description="the concept is back when the check reaches this value")
    mode: Literal["full", "lora"] = Field("full", description="full: every weight is trainable; lora: only an adapter")
    lora: LoraFields = Field(default_factory=lambda: LoraFields(target_modules="all-linear"),
                             description="the adapter of mode=lora (peft LoraConfig fields; default: all linear layers)")


def relearn(model: Any, batches: Sequence[dict], check: Callable[[Any], float], cfg: RelearnConfig | None = None,
            *, loss_fn: Callable[[Any, dict], Any] | None = None, progress: bool = False) -> dict:
    """Fine-tune ``model`` in place with next-token loss on ``batches`` (cycled); ``check(model)`` -> value in [0, 1].

    Returns ``{"curve": [{"step", "value", "loss"}], "steps_to_return": int | None, "threshold", "lr"}``;
    step 0 is the unlearned model before any attack. ``steps_to_return`` is None when the
    concept did not come back within ``cfg.steps`` (reported as "> steps", never as 0). With
    ``cfg.lrs`` the result is the worst case over the learning rates (fastest return, else the
    highest check value reached), with every run under ``by_lr``.
    """
    cfg = cfg or RelearnConfig()
    grid = list(dict.fromkeys([cfg.lr, *cfg.lrs]))
    if len(grid) == 1:
        return _relearn_one(model, batches, check, cfg, loss_fn, progress)
    runs = [_relearn_one(model if i == len(grid) - 1 else copy.deepcopy(model), batches, check,
                         cfg.model_copy(update={"lr": lr, "lrs": []}), loss_fn, progress) for i, lr in enumerate(grid)]
    worst = min(runs, key=lambda r: (r["steps_to_return"] is None, r["steps_to_return"] or 0,
                                     -max(c["value"] for c in r["curve"])))
    return {**worst, "by_lr": [{"lr": r["lr"], "steps_to_return": r["steps_to_return"], "curve": r["curve"]} for r in runs]}


def _relearn_one(model: Any, batches: Sequence[dict], check: Callable[[Any], float], cfg: RelearnConfig,
                 loss_fn: Callable[[Any, dict], Any] | None, progress: bool) -> dict:
    model = make_trainable(model, cfg.mode, cfg.lora).model
    loss_fn = loss_fn or (lambda m, b: nll(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]))
    curve = [{"step": 0, "value": float(check(model)), "loss": None}]
    state = {"back": curve[0]["value"] >= cfg.threshold}
    losses: list[float] = []

    def wrapped(m, b):
        loss = loss_fn(m, b)
        losses.append(float(loss.detach()))
        return loss

    def on_step(step: int, m: Any) -> bool:
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = float(check(m))
            curve.append({"step": step, "value": v, "loss": losses[-1]})
            m.train()
            if v >= cfg.threshold:
                state["back"] = True
                return True
        return False

    if not state["back"]:
        train(model, lambda step: batches[step % len(batches)], wrapped, TrainConfig(steps=cfg.steps, lr=cfg.lr),
              on_step=on_step, progress=progress, desc="relearn")
    back = next((c["step"] for c in curve if c["value"] >= cfg.threshold), None)
    return {"curve": curve, "steps_to_return": back, "threshold": cfg.threshold, "max_steps": cfg.steps,
            "mode": cfg.mode, "lr": cfg.lr}
