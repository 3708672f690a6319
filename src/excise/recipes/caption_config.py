"""Settings of the caption gender-bias workflow (`excise captions ...`, `recipes/caption_bias.yaml`).

Defaults run the whole workflow on the caption organism (:mod:`excise.organisms.caption_vlm`) in
the 10-minute budget on two CPU cores. Every pool of scenes is disjoint: ``organism`` scenes
build the model, ``locate`` scenes feed extraction, the SAE and the gender latents, ``mitigate``
scenes train the LoRA, and only ``eval`` scenes (balanced: half of each context per gender, and
``eval_hidden_rate`` with the cue hidden) are reported on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from excise.config import Device
from excise.intervene.caption_lora import GenderSwapLoraConfig
from excise.locate.sae_train import SAEConfig
from excise.organisms.caption_vlm import CaptionOrganismConfig


class ExtractConfig(BaseModel):
    """What the extract stage traces and how it pools."""

    model_config = {"extra": "forbid"}
    sites: list[str] = Field(["vision.*", "projector.out", "resid.*"],
                             description="vision-tower blocks, the projector output, language-model residuals "
                                         "(dropped for a contrastive model such as CLIP: images never enter its text tower)")
    pool: Literal["image", "mean", "last", "cls"] = Field(
        "image", description="image: mean over image positions (patches, or the image tokens in the language model)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    shard_size: int = Field(512, ge=1, description="samples per safetensors shard")


class SAEStageConfig(BaseModel):
    """Which activations the sparse autoencoder learns, and how."""

    model_config = {"extra": "forbid"}
    site: str = Field("projector.out", description="the site whose per-token activations the SAE learns (CLIP's "
                                                   "projector.out: one image embedding per image); its reconstruction "
                                                   "is spliced back there for the caption loss (CLIP: the zero-shot "
                                                   "gender cross-entropy)")
    # the organism's projector output is about 8-dimensional (8 principal components hold 99.8% of its
    # variance), so a wide dictionary leaves most latents dead: 16 latents, k = 4 (docs/captions.md)
    sae: SAEConfig = Field(default_factory=lambda: SAEConfig(architecture="topk", d_sae=16, k=4, epochs=30),
                           description="the SAE's settings (topk or the seed's l1)")
    top_latents: int = Field(4, ge=1, description="gender latents kept (largest |AUROC - 0.5| whose CI excludes 0.5)")
    edit: Literal["ablate", "clamp"] = Field(
        "clamp", description="the training-free mitigation: ablate the gender latents (set to 0) or clamp them to their "
                             "mean over both genders")


class CaptionBiasConfig(BaseModel):
    """The whole workflow; see the module docstring for the pools."""

    model_config = {"extra": "forbid"}
    model: str = Field("organism", description="'organism' (built and cached here), a hub id or a local VLM directory")
    organism: CaptionOrganismConfig = Field(default_factory=CaptionOrganismConfig, description="how the organism is built")
    data: str | None = Field(None, description="a caption folder in the seed's format (image_caption.csv + images/) "
                                               "instead of synthetic scenes; split by `seed` into locate/mitigate/eval")
    langs: list[Literal["en", "ar"]] = Field(["en", "ar"], description="caption languages evaluated and trained")
    n_eval: int = Field(400, ge=8, description="held-out evaluation scenes (balanced by context x gender)")
    eval_hidden_rate: float = Field(0.2, ge=0, le=1, description="share of evaluation scenes with the gender cue hidden")
    n_locate: int = Field(600, ge=8, description="scenes for extraction, the SAE and the gender latents")
    n_mitigate: int = Field(1000, ge=8, description="scenes (before twins) the gender-swap LoRA trains on")
    n_patch: int = Field(100, ge=1, description="scene/twin pairs for activation patching")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="the extract stage")
    sae: SAEStageConfig = Field(default_factory=SAEStageConfig, description="the sae and locate stages")
    mitigate: GenderSwapLoraConfig = Field(default_factory=GenderSwapLoraConfig, description="gender-swap LoRA")
    max_new_tokens: int = Field(16, ge=1, description="caption length limit")
    batch_size: int = Field(64, ge=1, description="images per generation batch")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples of every CI")
    seed: int = Field(0, description="scene pools, training and bootstrap")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights' dtype (bfloat16 for a 7B VLM on one GPU; the organism trains in float32)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")

    @model_validator(mode="after")
    def _check(self) -> "CaptionBiasConfig":
        if not self.langs:
            raise ValueError("langs must name at least one of en, ar")
        return self


def quick_variant(cfg: CaptionBiasConfig) -> CaptionBiasConfig:
    """A smoke-sized run (tests, `--quick`): a smaller organism and pools, short training."""
    org = cfg.organism.model_copy(update={"n_scenes": 512, "steps": 60})
    tr = cfg.mitigate.train.model_copy(update={"steps": 10})
    sae = cfg.sae.model_copy(update={"sae": cfg.sae.sae.model_copy(update={"epochs": 3})})
    return cfg.model_copy(update={"organism": org, "n_eval": 32, "n_locate": 48, "n_mitigate": 32, "n_patch": 8,
                                  "n_boot": 200, "mitigate": cfg.mitigate.model_copy(update={"train": tr}), "sae": sae})
