"""Settings of the fair-encoder workflow (`excise fair ...`, `recipes/fair_encoder.yaml`).

Defaults fit the 10-minute budget on two CPU cores with ``minilm-l6``: the BUG task in its binary
framing ({nurse, singer, dancer, teacher, secretary} vs the rest, where Fairlearn's equalized-odds
methods apply), training on a seeded subsample, selecting and calibrating on a validation
subsample, and reporting on the whole test split. Set ``train_limit``/``val_limit`` to null for
the full splits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from excise.config import Device
from excise.intervene.fair_baselines import BaselineConfig
from excise.intervene.fair_finetune import FairFinetuneConfig


# Chosen on the validation split of seed 0 (a 4-point sweep, docs/fair_encoders.md): lambda_adv 1 +
# lambda_eo 1 collapsed to a constant predictor; 0.1 + 0.3 at lr 1e-3 kept validation macro-F1 and cut
# the EO gap. Plain LoRA gets the same lr and epochs, so the two differ only by the fairness terms.
def _fair_default() -> FairFinetuneConfig:
    return FairFinetuneConfig(epochs=3, lr=1e-3, lambda_adv=0.1, lambda_eo=0.3, patience=0)


def _plain_default() -> FairFinetuneConfig:
    return FairFinetuneConfig(epochs=3, lr=1e-3, patience=0)


class SelectionConfig(BaseModel):
    """Which checkpoint of the fair model is reported: fair *and* useful (window selection)."""

    model_config = {"extra": "forbid"}
    start: int = Field(1, ge=1, description="first epoch of the window")
    end: int = Field(99, ge=1, description="last epoch of the window (clipped to the epochs trained)")
    threshold: float = Field(0.10, ge=0, description="largest validation fairness gap a selected checkpoint may have")
    min_utility: float = Field(0.5, ge=0, le=1, description=(
        "smallest validation utility a selected checkpoint may have: a constant predictor has gap 0 and, on a "
        "binary task, macro-F1 <= 0.5, so it is 'fair' without being useful"))
    fallback: Literal["best_fairness", "best_util"] = Field(
        "best_util", description="used, and said in the report, when no checkpoint of the window qualifies")


class UserData(BaseModel):
    """Your own labelled texts with a protected attribute: a CSV / TSV / JSONL file or a Hugging Face dataset."""

    model_config = {"extra": "forbid"}
    path: str = Field(..., description="a data file, a save_to_disk directory, or a hub dataset id (with hf: true)")
    hf: bool = Field(False, description="load with the datasets library (hub id or local dataset) instead of as a file")
    split: str | None = Field(None, description="hf: the dataset split to use (default: all, then split here)")
    text: str = Field("text", description="column of the text")
    text_pair: str | None = Field(None, description="column of the second text (query/document, resume/job)")
    label: str = Field("label", description="column of the label")
    groups: str | list[str] = Field("group", description="protected attribute column(s); the first is the one debiased")
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train / validation / test shares")


class FairEncoderConfig(BaseModel):
    """The whole workflow: data, baselines, plain and fair LoRA, selection, calibration, report, export."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("minilm-l6", description="embedded default, local directory or hub id of a text encoder")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    seed: int = Field(0, description="one seed for the data split, subsamples, training and bootstrap")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    data: Literal["bug", "user"] = Field("bug", description="bug: profession classification with the profession "
                                                            "masked (BUG); user: the table named in `user_data`")
    user_data: UserData | None = Field(None, description="data: user: your file or dataset and its columns")
    binary: bool = Field(True, description="BUG binary framing (Fairlearn baselines apply); false: 12 professions")
    cap_per_class: int = Field(1200, ge=10, description="BUG sentences per profession at most (ORGANISMS.md set-up)")
    train_limit: int | None = Field(2000, ge=10, description="seeded training subsample (null: the whole split)")
    val_limit: int | None = Field(800, ge=10, description="seeded validation subsample (null: the whole split)")
    plain: FairFinetuneConfig = Field(default_factory=_plain_default, description="the plain LoRA baseline (no fairness terms)")
    fair: FairFinetuneConfig = Field(default_factory=_fair_default, description="fairness-aware LoRA")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="checkpoint selection of the fair model")
    baselines: BaselineConfig = Field(default_factory=BaselineConfig, description="frozen-embedding baselines")
    balanced_threshold: bool = Field(False, description="tune the decision threshold on a group-balanced validation set")
    counterfactual: bool = Field(True, description="Grep-BiasIR counterfactual matching before and after")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples of every CI")

    @model_validator(mode="after")
    def _fair_has_a_fairness_term(self) -> "FairEncoderConfig":
        if (self.data == "user") != (self.user_data is not None):
            raise ValueError("set user_data exactly when data is 'user'")
        f = self.fair
        if not (f.lambda_adv or f.lambda_attr or f.lambda_dp or f.lambda_eo):
            raise ValueError("fair: set at least one of lambda_adv, lambda_attr, lambda_dp, lambda_eo (else it is plain)")
        if self.plain.lambda_adv or self.plain.lambda_attr or self.plain.lambda_dp or self.plain.lambda_eo:
            raise ValueError("plain: the baseline has no fairness terms; leave its lambdas at 0")
        return self


def quick_variant(cfg: FairEncoderConfig) -> FairEncoderConfig:
    """A smoke run: small subsamples, one epoch each, few resamples."""
    upd = {"epochs": 1}
    return cfg.model_copy(update={"train_limit": 256, "val_limit": 128, "n_boot": 50, "cap_per_class": 100,
                                  "plain": cfg.plain.model_copy(update=upd), "fair": cfg.fair.model_copy(update=upd)})
