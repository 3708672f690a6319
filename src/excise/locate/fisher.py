"""Parameter-level Fisher scores: mean squared gradient of the forget loss per parameter.

Why: the empirical Fisher diagonal measures how sharply the forget data's likelihood depends
on each parameter, i.e. where the skill is stored, without needing an unlearned model.
Feed the scores to :func:`excise.locate.paramdiff.param_masks` for a noise mask.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.lm import lm_batch
from excise.locate.base import LOCALIZERS, LocateData
from excise.losses import nll
from excise.units import Scores, aggregate_param_scores
from excise.registry import Configured
from excise.train import requires_grad


def fisher_scores(model: Any, tokenizer: Any, items: Sequence[Any], *, batch_size: int = 16,
                  loss_on: str = "all") -> Scores:
    """Mean over batches of the squared gradient of the forget NLL (one value per parameter)."""
    if not items:
        raise ExciseError("fisher_scores needs at least one forget item")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in named}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = 0
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        b = lm_batch(tokenizer, [it.text for it in chunk], prompts=[it.prompt for it in chunk] if loss_on == "answer" else None)
        b = {k: v.to(device) for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        loss = nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss.backward()
        for n, p in named:
            if p.grad is not None:
                acc[n] += p.grad.detach().float().cpu().pow(2)
        n_batches += 1
    model.zero_grad(set_to_none=True)
    if was_training:
        model.train()
    return Scores(kind="param", values={n: v / n_batches for n, v in acc.items()}, method="fisher",
                  meta={"n_items": len(items), "n_batches": n_batches})


class FisherConfig(BaseModel):
    """Settings of the Fisher localizer."""

    model_config = {"extra": "forbid"}
    unit: Literal["param", "head", "neuron"] = Field(
        "param", description="param: one score per weight; head/neuron: summed over each unit's input columns")
    batch_size: int = Field(16, ge=1, description="forget examples per backward pass")
    loss_on: Literal["all", "answer"] = Field("answer", description="tokens the forget NLL counts: all, or the response")


@LOCALIZERS.register
class FisherLocalizer(Configured):
    """Empirical Fisher diagonal of the forget NLL: where the forget data's likelihood is most sensitive."""

    name = "fisher"
    Config = FisherConfig
    needs = ("forget",)

    def score(self, handle: Any, data: LocateData) -> Scores:
        data.require(self.needs, self.name)
        with requires_grad(handle.model, True) as model:
            sc = fisher_scores(model, handle.tokenizer, list(data.forget), batch_size=self.config.batch_size,
                               loss_on=self.config.loss_on)
        return aggregate_param_scores(sc, handle.anatomy, self.config.unit)
