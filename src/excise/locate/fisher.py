"""Parameter-level Fisher scores: the empirical Fisher diagonal of the forget answers.

Why: the empirical Fisher diagonal ``F_i = E_n[(d/dtheta_i log p(answer_n | prompt_n))^2]``
measures how sharply the forget data's likelihood depends on each parameter, i.e. where the
skill is stored, without needing an unlearned model. It is a mean over *examples* of squared
per-example gradients (one backward pass per example; the square of a batch-mean gradient is
not a Fisher: gradients of different examples cancel before squaring). With
``retain_weight`` = lambda > 0 the score is ``max(F_forget - lambda * F_retain, 0)``: parameters
the retain data needs as much are not singled out (a retain contrast, as in selective synaptic
dampening). Feed the scores to :func:`excise.locate.paramdiff.param_masks` for a noise mask.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.lm import lm_batch
from excise.locate.base import LOCALIZERS, LocateData
from excise.losses import sequence_logprob
from excise.units import Scores, aggregate_param_scores
from excise.registry import Configured
from excise.train import requires_grad


def fisher_diagonal(model: Any, tokenizer: Any, items: Sequence[Any], *, batch_size: int = 16,
                    loss_on: str = "answer") -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's NLL (summed over its counted tokens)."""
    if not items:
        raise ExciseError("fisher_scores needs at least one item")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in named}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for s in range(0, len(items), batch_size):  # tokenised in chunks, one forward/backward per example
        chunk = items[s:s + batch_size]
        b = lm_batch(tokenizer, [it.text for it in chunk], prompts=[it.prompt for it in chunk] if loss_on == "answer" else None)
        for i in range(len(chunk)):
            n_tok = int(b["attention_mask"][i].sum())  # right padding: the example is the first n_tok tokens
            ids, mask, labels = (b[k][i:i + 1, :n_tok].to(device) for k in ("input_ids", "attention_mask", "labels"))
            model.zero_grad(set_to_none=True)
            (-sequence_logprob(model(input_ids=ids, attention_mask=mask).logits, labels).sum()).backward()
            for n, p in named:
                if p.grad is not None:
                    acc[n] += p.grad.detach().float().cpu().pow(2)
    model.zero_grad(set_to_none=True)
    if was_training:
        model.train()
    return {n: v / len(items) for n, v in acc.items()}


def fisher_scores(model: Any, tokenizer: Any, items: Sequence[Any], *, batch_size: int = 16, loss_on: str = "answer",
                  retain_items: Sequence[Any] | None = None, retain_weight: float = 0.0) -> Scores:
    """Empirical Fisher diagonal of the forget items, minus ``retain_weight`` x the retain items' (clamped at 0)."""
    if retain_weight > 0 and not retain_items:
        raise ExciseError("fisher_scores: retain_weight > 0 needs retain items")
    values = fisher_diagonal(model, tokenizer, items, batch_size=batch_size, loss_on=loss_on)
    if retain_weight > 0:
        ret = fisher_diagonal(model, tokenizer, retain_items, batch_size=batch_size, loss_on=loss_on)
        values = {n: (v - retain_weight * ret[n]).clamp(min=0) for n, v in values.items()}
    return Scores(kind="param", values=values, method="fisher",
                  meta={"n_items": len(items), "per_example": True, "loss_on": loss_on, "retain_weight": retain_weight,
                        "n_retain_items": len(retain_items or []) if retain_weight > 0 else 0})


class FisherConfig(BaseModel):
    """Settings of the Fisher localizer."""

    model_config = {"extra": "forbid"}
    unit: Literal["param", "head", "neuron"] = Field(
        "param", description="param: one score per weight; head/neuron: summed over each unit's input columns")
    batch_size: int = Field(16, ge=1, description="examples tokenised together (each still gets its own backward pass)")
    loss_on: Literal["all", "answer"] = Field("answer", description="tokens each example's NLL counts: all, or the response")
    retain_weight: float = Field(0.0, ge=0, description="subtract this x the retain Fisher, clamped at 0 (0: no retain contrast)")


@LOCALIZERS.register
class FisherLocalizer(Configured):
    """Empirical Fisher diagonal of the forget NLL: where the forget data's likelihood is most sensitive."""

    name = "fisher"
    Config = FisherConfig
    needs = ("forget",)

    def score(self, handle: Any, data: LocateData) -> Scores:
        c = self.config
        data.require(("forget", "retain") if c.retain_weight > 0 else self.needs, self.name)
        with requires_grad(handle.model, True) as model:
            sc = fisher_scores(model, handle.tokenizer, list(data.forget), batch_size=c.batch_size, loss_on=c.loss_on,
                               retain_items=list(data.retain or []), retain_weight=c.retain_weight)
        return aggregate_param_scores(sc, handle.anatomy, c.unit)
