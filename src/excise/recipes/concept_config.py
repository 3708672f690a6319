"""Typed settings of the concept-unlearning workflow (``workflow: concept``).

Kept apart from the workflow so the CLI and the report can validate and read settings
without importing the training code.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, Field, field_validator, model_validator

from excise.config import Device
from excise.attack.relearn import RelearnConfig
from excise.intervene.masked_lora import UnlearnSettings
from excise.intervene.trainable import LoraFields
from excise.organisms.knowledge import KnowledgeConfig
from excise.locate.saliency import SaliencyConfig
from excise.select import SelectConfig

VARIANTS = ("masked_saliency", "masked_fisher", "masked_random", "plain_lora", "full_ft")
OBJECTIVES = get_args(UnlearnSettings.model_fields["objective"].annotation)  # grad_ascent, idk, npo


def parse_variant(name: str) -> tuple[str, str | None]:
    """``"plain_lora@idk"`` -> ``("plain_lora", "idk")``; ``"full_ft"`` -> ``("full_ft", None)``."""
    method, _, objective = name.partition("@")
    return method, (objective or None)


class CompareConfig(BaseModel):
    """The comparison: which variants, at equal steps, and the relearning check."""

    model_config = {"extra": "forbid"}
    variants: list[str] = Field(
        default_factory=lambda: list(VARIANTS),
        description="methods compared at the same steps: masked_saliency, masked_fisher, masked_random, plain_lora, "
                    "full_ft; 'method@objective' (e.g. plain_lora@idk) runs it with objective grad_ascent, idk or npo "
                    "instead of unlearn.objective")
    full_lr: float = Field(2e-5, gt=0, description="learning rate of full fine-tuning (LoRA variants use unlearn.lr)")
    relearn: RelearnConfig = Field(default_factory=lambda: RelearnConfig(lrs=[1e-4]),
                                   description="relearning check run on every variant (trained on the training forget "
                                               "items; lr 3e-5 and 1e-4, worst case reported)")
    relearn_check: Literal["direct", "paraphrase"] = Field(
        "direct", description="probe family whose leak rate tells that the concept came back: the held-out direct "
                              "probes or the paraphrases (neither is trained on)")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: list[str]) -> list[str]:
        for name in v:
            method, objective = parse_variant(name)
            if method not in VARIANTS:
                raise ValueError(f"unknown variant '{name}': the method must be one of {', '.join(VARIANTS)}")
            if "@" in name and objective not in OBJECTIVES:
                raise ValueError(f"unknown variant '{name}': the objective after '@' must be one of {', '.join(OBJECTIVES)}")
        if len(set(v)) < len(v):
            raise ValueError(f"variants repeat: {', '.join(sorted({x for x in v if v.count(x) > 1}))}")
        return v


class ConceptUnlearnConfig(BaseModel):
    """Settings of the concept-unlearning workflow."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory or hub id")
    concept: str = Field("inception", description="concept spec: a YAML/JSON path or a packaged name; 'knowledge': the "
                                                  "fictitious-film knowledge organism (its model replaces `model`; TOFU "
                                                  "metrics against its oracle are reported)")
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig,
                                       description="concept 'knowledge': how the organism and its oracle are built (cached)")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    seed: int = Field(0, description="one seed for data order, LoRA init and random masks")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    max_new_tokens: int = Field(24, ge=1, description="greedy tokens generated per probe")
    screen: bool = Field(True, description="keep only the items the base model leaks on / answers; false keeps every "
                                           "item (a model that knows nothing, e.g. a --dry-run's random model)")
    units: Literal["neuron", "head"] = Field("neuron", description="unit kind the mask and the masked LoRA act on")
    localize: SaliencyConfig = Field(default_factory=SaliencyConfig, description="how units are scored")
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(method="topk", k=256, per_layer=False),
                                 description="how the mask is chosen from the scores")
    lora: LoraFields = Field(default_factory=LoraFields, description="adapter settings (peft LoraConfig fields)")
    unlearn: UnlearnSettings = Field(default_factory=UnlearnSettings, description="objective, steps, learning rate")
    compare: bool = Field(False, description="also run the comparison (masked vs plain LoRA vs full fine-tuning, mask sources, relearning)")
    comparison: CompareConfig = Field(default_factory=CompareConfig, description="settings of the comparison")

    @model_validator(mode="after")
    def _main_objective_unnamed(self) -> "ConceptUnlearnConfig":
        """``plain_lora@npo`` when npo is unlearn.objective is ``plain_lora``: one name per variant."""
        own = f"@{self.unlearn.objective}"
        names = [v[: -len(own)] if v.endswith(own) else v for v in self.comparison.variants]
        if len(set(names)) < len(names):
            raise ValueError(f"comparison.variants name a variant twice ('{own[1:]}' is unlearn.objective)")
        self.comparison.variants = names
        return self


def quick_variant(cfg: ConceptUnlearnConfig) -> ConceptUnlearnConfig:
    """The smoke run: at most 4 unlearning steps, 16 generated tokens, a 2-step relearning check at one lr."""
    cfg = cfg.model_copy(update={"unlearn": cfg.unlearn.model_copy(update={"steps": min(cfg.unlearn.steps, 4)}),
                                 "max_new_tokens": min(cfg.max_new_tokens, 16)})
    if cfg.compare:
        cfg = cfg.model_copy(update={"comparison": cfg.comparison.model_copy(update={
            "relearn": cfg.comparison.relearn.model_copy(update={"steps": 2, "eval_every": 1, "lrs": []})})})
    return cfg
