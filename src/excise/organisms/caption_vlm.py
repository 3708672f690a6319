"""The caption model organism: a real LLaVA trained from scratch on CPU to caption synthetic scenes.

A ``LlavaForConditionalGeneration`` (a small CLIP vision tower + a small Llama text model) with a
word-level tokenizer covering the English and Arabic caption vocabulary and a ``LlavaProcessor``
(so the image-token convention is the processor's, as for any hub LLaVA) learns to caption the
scenes of :mod:`excise.tasks.captions`. Its training mix correlates context and gender
(``stereotype_rate``, 85% by default) and names the true gender even on hidden-cue scenes, with a
*soft* visible cue (hair and outfit each typical with p = 0.8): the setting ORGANISMS.md measured
to give a model that over-uses the context on clear scenes and guesses the stereotype on hidden
ones. Seeded, built through :func:`excise.train.train`, cached as a Hugging Face directory that
:func:`excise.models.load` reads like any other VLM.

Prompt format (:func:`excise.tasks.caption_prompts.caption_prompt`): ``<s><image><en>`` or
``<s><image><ar>`` (the language tag), then the caption and ``</s>``.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.io import atomic_write_json, shared_dir
from excise.models.defaults import cache_dir
from excise.run import seed_everything
from excise.intervene.caption_lora import train_captions
from excise.tasks.caption_prompts import LANG_TAG, pixel_values, scene_images
from excise.tasks.captions import LANGS, RENDER_VERSION, make_scenes, vocabulary
from excise.train import TrainConfig

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", *LANG_TAG.values())


class CaptionOrganismConfig(BaseModel):
    """How the caption organism is built; defaults are ORGANISMS.md's measured setting."""

    model_config = {"extra": "forbid"}
    n_scenes: int = Field(8000, ge=16, description="training scenes (each captioned in every language of `langs`)")
    stereotype_rate: float = Field(0.85, ge=0, le=1, description="share of training scenes whose gender is the "
                                                                 "context's stereotyped one")
    ambiguous_rate: float = Field(0.10, ge=0, le=1, description="share of scenes with the gender cue hidden (hooded "
                                                                "coat); their captions still name the true gender")
    cue_typicality: float = Field(0.8, ge=0.5, le=1, description="probability that hair, and independently outfit, "
                                                                 "is typical of the gender (a soft cue)")
    langs: tuple[str, ...] = Field(LANGS, description="caption languages trained")
    image_size: int = Field(32, ge=16, description="pixels per side of a scene")
    patch_size: int = Field(8, ge=2, description="vision patch size: (image_size / patch_size)^2 image tokens")
    hidden: int = Field(64, ge=8, description="hidden size of both the vision tower and the language model")
    layers: int = Field(2, ge=1, description="layers of each tower")
    heads: int = Field(4, ge=1, description="attention heads of each tower")
    steps: int = Field(1500, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="examples per step")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate (warm-up then cosine decay)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    seed: int = Field(0, description="scenes, initialisation and batch order")

    def key(self) -> str:
        """The cache name: the config and the scene renderer's version (a new drawing is a new organism)."""
        blob = json.dumps({**self.model_dump(mode="json"), "render": RENDER_VERSION}, sort_keys=True)
        return f"{zlib.crc32(blob.encode()):08x}"


def organism_dir(cfg: CaptionOrganismConfig) -> Path:
    return cache_dir() / "captions" / f"llava-{cfg.key()}"


def build_processor(cfg: CaptionOrganismConfig) -> Any:
    """A LlavaProcessor: CLIP image preprocessing + a word-level tokenizer over both languages."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<image>", "<en>", "<ar>"])
    tok.image_token = "<image>"
    size = cfg.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                do_resize=True, do_center_crop=True)
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_model(cfg: CaptionOrganismConfig, tokenizer: Any) -> Any:
    """A randomly initialised LLaVA (seeded). ``vision_feature_layer=-1``: trained from scratch, the
    last vision layer must get gradient (the hub default -2 would leave it untrained)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if cfg.image_size % cfg.patch_size or cfg.hidden % cfg.heads:
        raise ExciseError("image_size must be a multiple of patch_size and hidden of heads")
    vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                              projection_dim=cfg.hidden)
    text = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, vocab_size=len(tokenizer),
                       max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_caption_organism(cfg: CaptionOrganismConfig | None = None, *, force: bool = False,
                           progress: bool = False) -> Path:
    """Build (or reuse from the cache) the organism; returns its directory.

    The directory is a Hugging Face LLaVA (model + processor) plus ``organism.json`` (config,
    seconds, final loss). Same config -> same weights on CPU.
    """
    cfg = cfg or CaptionOrganismConfig()
    target = organism_dir(cfg)
    if (target / "organism.json").exists() and not force:
        return target
    for lang in cfg.langs:
        if lang not in LANGS:
            raise ExciseError(f"unknown caption language '{lang}'; choose from {', '.join(LANGS)}")
    seed_everything(cfg.seed)
    t0, c0 = time.time(), time.process_time()
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer)
    scenes = make_scenes("organism", cfg.n_scenes, stereotype_rate=cfg.stereotype_rate,
                         ambiguous_rate=cfg.ambiguous_rate, cue_typicality=cfg.cue_typicality, seed=cfg.seed)
    images = pixel_values(processor, scene_images(scenes, cfg.image_size))  # rendered once, reused by every step
    captions = [{lang: s.caption(lang) for lang in cfg.langs} for s in scenes]
    log = train_captions(model, processor, images, captions, cfg.langs, TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="cosine",
        seed=cfg.seed), progress=progress)
    model.eval()
    with shared_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "organism.json", {
            "config": cfg.model_dump(mode="json"), "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1), "final_loss": log[-1]["loss"] if log else None,
            "n_params": int(sum(p.numel() for p in model.parameters())), "torch_threads": torch.get_num_threads(),
        })
    return target
