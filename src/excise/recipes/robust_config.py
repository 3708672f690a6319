"""Typed settings of the robust-unlearning workflow (``workflow: undo``) and its quick variant.

Kept apart from the workflow so the report and the tests can read settings without the
training code.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from excise.attack.relearn_arithmetic import RelearnConfig
from excise.intervene.undo import DistillConfig
from excise.intervene.unlearn_methods import UnlearnConfig
from excise.locate.snmf import SNMFConfig
from excise.organisms.arithmetic import PretrainConfig


def _default_methods() -> dict[str, UnlearnConfig]:
    # Learning rates / step counts picked on the dev pool by benchmarks/undo_tune.py (seed 0; lowest dev forget
    # accuracy among settings keeping dev retain >= 90% of the base's; results in benchmarks/results/undo_tune.md);
    # answer tokens only. The test pool never took part.
    return {
        "grad_ascent": UnlearnConfig(method="grad_ascent", steps=10, lr=2e-4, loss_on="answer"),
        "grad_diff": UnlearnConfig(method="grad_diff", steps=20, lr=3e-4, loss_on="answer"),
        "maxent": UnlearnConfig(method="maxent", steps=60, lr=5e-4, loss_on="answer"),
        "npo": UnlearnConfig(method="npo", steps=120, lr=2e-4, loss_on="answer"),
        "rmu": UnlearnConfig(method="rmu", steps=40, lr=1e-3, rmu_layer=0, loss_on="answer"),
    }


class TargetedConfig(BaseModel):
    """One targeted-noise variant of UNDO."""

    model_config = {"extra": "forbid"}
    localizer: Literal["paramdiff", "snmf", "fisher"] = Field(..., description="where the mask comes from")
    alpha: float = Field(0.8, ge=0, le=1, description="noise strength inside the mask")
    top_p: float = Field(0.1, gt=0, le=1, description="fraction of each tensor (paramdiff, fisher) or of each layer's neurons (snmf) masked")
    mode: Literal["binary", "relative"] = Field("binary", description="paramdiff/fisher mask: top-p binary, or score / max (relative)")
    retain_weight: float = Field(0.0, ge=0, description="fisher only: score = max(F_forget - retain_weight x F_retain, 0) (0: no retain contrast)")

    @property
    def name(self) -> str:
        extra = f"-{self.mode}" if self.localizer != "snmf" else ""
        extra += f"-r{self.retain_weight:g}" if self.localizer == "fisher" and self.retain_weight else ""
        return f"undo-{self.localizer}{extra}-a{self.alpha:g}"


class RobustUnlearnConfig(BaseModel):
    """Settings of the robust-unlearning comparison (`excise run recipes/robust_unlearn.yaml`)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str | None = Field(None, description="a Hugging Face decoder (directory or hub id) instead of the pretrained base; no oracle then")
    forget_file: str | None = Field(None, description="JSONL forget items {prompt, answer, op} (default: the packaged mul/div generator)")
    retain_file: str | None = Field(None, validate_default=True, description="JSONL retain items (default: the packaged add/sub generator)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="base-model pretraining (the oracle drops mul and div)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="seeds of unlearning, noise, distillation and attacks")
    methods: dict[str, UnlearnConfig] = Field(default_factory=_default_methods, description="unlearning methods to compare, by name")
    undo_from: str = Field("maxent", description="which unlearned model UNDO noises and distils from (the paper uses MaxEnt)")
    alphas: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.2, 0.5, 0.8],
                                                             description="global-noise strengths of UNDO, each in (0, 1]")
    beta: float = Field(0.1, ge=0, description="scale of the Xavier noise")
    targeted: list[TargetedConfig] = Field(
        default_factory=lambda: [TargetedConfig(localizer="paramdiff"), TargetedConfig(localizer="snmf"),
                                 TargetedConfig(localizer="fisher")],
        description="targeted-noise variants")
    snmf: SNMFConfig = Field(default_factory=SNMFConfig, description="SNMF localizer settings")
    localize_n: int = Field(256, ge=8, description="forget (and retain) items used by the localizers")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="distillation settings")
    relearn: RelearnConfig = Field(default_factory=RelearnConfig, description="relearning attack settings")
    eval_n_per_op: int = Field(100, ge=1, description="held-out items per operation for forget / retain accuracy")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    checkpoint_every: int = Field(0, ge=0, description="unlearning: a resumable training checkpoint every this many "
                                  "steps (0: none; a killed run redoes the method it was in). Not part of the run's "
                                  "identity: results do not depend on it")

    @field_validator("undo_from")
    @classmethod
    def _known_method(cls, v: str, info: ValidationInfo) -> str:
        methods = info.data.get("methods")
        if methods is not None and v not in methods:
            raise ValueError(f"'{v}' is not one of the methods ({', '.join(methods)})")
        return v

    @field_validator("retain_file")
    @classmethod
    def _both_files(cls, v: str | None, info: ValidationInfo) -> str | None:
        if bool(v) != bool(info.data.get("forget_file")):
            raise ValueError("give both forget_file and retain_file (or neither)")
        return v


QUICK = {
    "seeds": lambda c: c.seeds[:1],
    "alphas": lambda c: [0.5] if 0.5 in c.alphas or not c.alphas else c.alphas[:1],
    "eval_n_per_op": lambda c: min(c.eval_n_per_op, 50),
    "localize_n": lambda c: min(c.localize_n, 128),
}


def quick_variant(cfg: RobustUnlearnConfig) -> RobustUnlearnConfig:
    """One seed, one global alpha, shorter distillation and attacks (two learning rates, 60 steps)."""
    upd = {k: f(cfg) for k, f in QUICK.items()}
    upd["distill"] = cfg.distill.model_copy(update={"max_steps": min(cfg.distill.max_steps, 100),
                                                    "eval_n_per_op": min(cfg.distill.eval_n_per_op, 30)})
    lrs = cfg.relearn.lrs
    upd["relearn"] = cfg.relearn.model_copy(update={"lrs": sorted({lrs[len(lrs) // 2], lrs[-1]}), "steps": min(cfg.relearn.steps, 60),
                                                    "eval_every": min(cfg.relearn.eval_every, 20),
                                                    "eval_n_per_op": min(cfg.relearn.eval_n_per_op, 30)})
    return cfg.model_copy(update=upd)
