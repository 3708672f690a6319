"""Gender-swap LoRA for captioning VLMs (the seed's mitigation), and the captioning trainer it runs on.

:func:`train_captions` is teacher-forced captioning through :func:`excise.train.train`: every
(image, language) pair is one example, the loss covers the caption tokens and ``</s>``. The
organism is pretrained with it, the mitigation fine-tunes with it.

:func:`gender_swap_lora` builds its training set from items that never appear in evaluation:

* every visible-gender item and its **counterfactual twin**: the caption with its gender words
  swapped (:func:`excise.tasks.caption_swap.swap_caption`, English and Arabic agreement) and,
  where the renderer can draw it (``swap_images``), the image with the gender cue swapped too.
  Pairs that differ only in the person teach the model to read the person, not the context
  (the context predicts nothing any more);
* every item whose gender cue is hidden, captioned with the neutral wording ("a person" /
  "شخص"), so the model stops guessing a gender it cannot see.

Only a LoRA adapter on the language model trains (base weights frozen: checked after training).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.intervene.trainable import LoraFields, make_trainable
from excise.tasks.caption_prompts import caption_batch, pixel_values, scene_images
from excise.tasks.caption_swap import swap_caption
from excise.tasks.captions import LANGS
from excise.train import TrainConfig, train

LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def train_captions(model: Any, processor: Any, images: torch.Tensor, captions: Sequence[dict[str, str]],
                   langs: Sequence[str], tcfg: TrainConfig, *, progress: bool = False,
                   checkpoint_dir: Any = None) -> list[dict]:
    """Teacher-forced captioning; ``images`` [N, 3, H, W] pixel values, ``captions[i]`` {lang: text}."""
    if len(images) != len(captions):
        raise ExciseError(f"{len(images)} images but {len(captions)} caption sets")
    items = [(i, lang) for i in range(len(captions)) for lang in langs if lang in captions[i]]

    def loss_fn(m: Any, chunk: list[tuple[int, str]]) -> torch.Tensor:
        batch = caption_batch(processor, [(lang, captions[i][lang]) for i, lang in chunk])
        idx = torch.tensor([i for i, _ in chunk])
        dev = next(m.parameters()).device
        return m(**{k: v.to(dev) for k, v in batch.items()}, pixel_values=images[idx].to(dev)).loss

    return train(model, items, loss_fn, tcfg, progress=progress, desc="captions",
                 checkpoint_dir=checkpoint_dir).log


class GenderSwapLoraConfig(BaseModel):
    """Gender-swap LoRA settings; defaults measured on the organism (docs/captions.md)."""

    model_config = {"extra": "forbid"}
    lora: LoraFields = Field(default_factory=lambda: LoraFields(target_modules=LM_LINEAR),
                             description="peft LoRA fields; default: every linear layer of the language model")
    swap_images: bool = Field(True, description="draw each twin with the gender cue swapped too (synthetic scenes only)")
    neutral_hidden: bool = Field(True, description="caption hidden-cue scenes with the neutral wording")
    neutral_repeats: int = Field(2, ge=1, description="copies of each hidden-cue item (a visible item contributes two: "
                                                      "itself and its twin)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, batch_size=32, lr=2e-3, warmup_steps=20,
                                                                  schedule="cosine"),
                               description="the training loop's settings")


def swap_training_set(scenes: Sequence[Any], langs: Sequence[str], cfg: GenderSwapLoraConfig,
                      size: int) -> tuple[list[Any], list[dict[str, str]]]:
    """(images, captions) of the mitigation set: items, their twins, neutral captions on hidden ones."""
    images, caps = [], []
    for s in scenes:
        if not s.visible and cfg.neutral_hidden:
            images += [s] * cfg.neutral_repeats
            caps += [{lang: s.caption(lang, neutral_if_hidden=True) for lang in langs}] * cfg.neutral_repeats
            continue
        images.append(s)
        caps.append({lang: s.caption(lang) for lang in langs})
        twin = s.twin() if cfg.swap_images else None
        images.append(twin if twin is not None else s)  # a photograph keeps its image: caption swap only
        caps.append({lang: swap_caption(s.caption(lang), lang) for lang in langs})
    return scene_images(images, size), caps


def gender_swap_lora(handle: Any, scenes: Sequence[Any], langs: Sequence[str] = LANGS,
                     cfg: GenderSwapLoraConfig | None = None, *, size: int = 32, progress: bool = False,
                     checkpoint_dir: Any = None) -> tuple[Any, dict]:
    """Fine-tune a LoRA adapter on the gender-swap set; returns (new handle, info). The caller's
    handle is not changed: the adapter wraps a copy of the model."""
    import copy

    cfg = cfg or GenderSwapLoraConfig()
    if handle.processor is None:
        raise ExciseError("gender-swap LoRA needs a vision-language model with a processor")
    imgs, caps = swap_training_set(scenes, langs, cfg, size)
    model = copy.deepcopy(handle.model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tr = make_trainable(model, "lora", cfg.lora, seed=cfg.train.seed)
    n_trainable = tr.n_trainable
    log = train_captions(tr.model, handle.processor, pixel_values(handle.processor, imgs), caps, langs, cfg.train,
                         progress=progress, checkpoint_dir=checkpoint_dir)
    merged = tr.model.merge_and_unload() if hasattr(tr.model, "merge_and_unload") else tr.model
    changed = [k for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])]
    outside = [k for k in changed if "language_model" not in k]
    if outside:  # pragma: no cover - peft only adapts the targeted modules
        raise ExciseError(f"gender-swap LoRA changed weights outside the language model: {outside[:3]}")
    merged.eval()
    info = {"n_train_images": len(imgs), "n_trainable": n_trainable, "final_loss": log[-1]["loss"] if log else None,
            "steps": len(log), "changed_tensors": len(changed), "base_weights_outside_lm_unchanged": True}
    return handle.with_model(merged, name=f"{handle.name}+gender-swap-lora"), info
