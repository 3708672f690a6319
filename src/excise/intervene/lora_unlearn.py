"""Masked-LoRA unlearning as a registered intervention: any head or neuron mask, any task's examples.

The adapter may only write the selected units' input columns of the attention output or MLP
down-projection (:class:`~excise.intervene.masked_lora.MaskedLora`); it is trained with the
concept workflow's objective (NPO, gradient ascent or IDK on the forget responses, KL to the
frozen model on the retain responses) and merged, so units outside the mask are bit-identical.
Without a mask it is plain LoRA on every unit of ``unit`` kind: the "fine-tuning alone" baseline.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import Field

from excise.intervene.base import INTERVENTIONS, check_mask, result_handle
from excise.intervene.masked_lora import UnlearnSettings, all_units, unlearn_concept
from excise.intervene.trainable import LoraFields, make_trainable
from excise.locate.base import LocateData
from excise.registry import Configured


class MaskedLoraUnlearnConfig(UnlearnSettings):
    """Unlearning settings (objective, steps, lr, retain weight) plus the adapter's fields."""

    lora: LoraFields = Field(default_factory=LoraFields, description="adapter fields (peft LoraConfig names)")
    unit: Literal["neuron", "head"] = Field("neuron", description="without a mask: adapt every unit of this kind")
    refusal: str = Field("I don't know.", description="objective idk: the response trained towards")


@INTERVENTIONS.register
class MaskedLoraUnlearn(Configured):
    """Unlearn the forget responses with a LoRA confined to the masked heads or neurons (merged into a copy)."""

    name = "masked_lora"
    Config = MaskedLoraUnlearnConfig
    accepts = ("neuron", "head", None)
    masked = True

    def apply(self, handle: Any, mask: Any, data: LocateData) -> Any:
        check_mask(self, mask)
        data.require(("forget", "retain") if self.config.retain_weight > 0 else ("forget",), self.name)
        c = self.config
        model = copy.deepcopy(handle.model)
        mask = mask if mask is not None else all_units(model, c.unit)
        tr = make_trainable(model, "masked_lora", c.lora, mask=mask, seed=c.seed)
        work = handle.with_model(tr.model)
        spec = SimpleNamespace(forget=list(data.forget), retain=list(data.retain), retain_train=None, refusal=c.refusal)
        settings = UnlearnSettings(**c.model_dump(exclude={"lora", "unit", "refusal"}))
        log = unlearn_concept(work, tr.model, spec, settings)
        return result_handle(handle, tr.masked.merge_and_unload(), train_log=log)
