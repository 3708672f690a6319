"""Captioning prompts and teacher-forced batches for vision-language models.

The image-token convention is always the processor's: a chat-templated VLM (LLaVA-1.5 on the
hub, Qwen2-VL, SmolVLM) gets its chat template with an image entry and an instruction per
language; a processor without a chat template (the organism of
:mod:`excise.organisms.caption_vlm`) gets ``<s><image><en>`` / ``<s><image><ar>``, a language tag
its word-level tokenizer knows. Either way the processor expands the image placeholder into as
many image tokens as the vision tower yields patches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from excise.errors import ExciseError
from excise.tasks.captions import LANGS, Scene

LANG_TAG = {"en": "<en>", "ar": "<ar>"}
INSTRUCTION = {"en": "Describe the person in this image in one short sentence.",
               "ar": "صف الشخص في هذه الصورة في جملة قصيرة واحدة."}


def caption_prompt(processor: Any, lang: str) -> str:
    """The captioning prompt for ``lang`` in the processor's own convention."""
    if lang not in LANGS:
        raise ExciseError(f"unknown caption language '{lang}'; choose one of {', '.join(LANGS)}")
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION[lang]}]}]
        try:
            return processor.apply_chat_template(msgs, add_generation_prompt=True)
        except AttributeError as e:
            if "video_processor" not in str(e):
                raise
            # an image-only SmolVLM processor (no torchvision) reads video settings even for images:
            # render the same template with its tokenizer
            return processor.tokenizer.apply_chat_template(msgs, chat_template=processor.chat_template,
                                                           tokenize=False, add_generation_prompt=True)
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids(LANG_TAG[lang]) in (None, tok.unk_token_id):
        raise ExciseError(f"the processor has no chat template and its tokenizer no '{LANG_TAG[lang]}' token: "
                          "cannot build a captioning prompt")
    image = getattr(processor, "image_token", None) or getattr(tok, "image_token", None) or "<image>"
    return f"{tok.bos_token or ''}{image}{LANG_TAG[lang]}"


def image_size(processor: Any) -> int:
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    return int(crop.get("height") or size.get("height") or size.get("shortest_edge") or 32)


def pixel_values(processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """Preprocess PIL images with the processor's image processor: [N, 3, H, W]."""
    return processor.image_processor(list(images), return_tensors="pt")["pixel_values"]


def scene_images(scenes: Sequence[Scene], size: int) -> list[Any]:
    return [s.image(size) for s in scenes]


# (id(processor), lang) -> (processor, ids): the processor is kept so its id cannot be reused by another
_PROMPT_IDS: dict[tuple[int, str], tuple[Any, list[int]]] = {}


def prompt_ids(processor: Any, lang: str) -> list[int]:
    """The prompt's token ids exactly as the processor builds them (image placeholder expanded)."""
    key = (id(processor), lang)
    hit = _PROMPT_IDS.get(key)
    if hit is None or hit[0] is not processor:
        from PIL import Image

        size = image_size(processor)
        enc = processor(text=[caption_prompt(processor, lang)], images=[[Image.new("RGB", (size, size))]],
                        return_tensors="pt")
        hit = _PROMPT_IDS[key] = (processor, enc["input_ids"][0].tolist())
    return hit[1]


def caption_batch(processor: Any, lang_captions: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels for (lang, caption) pairs, right-padded; loss on caption + eos.

    Valid for processors whose image-token count does not depend on the image (fixed-size
    images: LLaVA, the organism); the prompt ids come from the processor once per language.
    """
    tok = processor.tokenizer
    prompts = {lang: prompt_ids(processor, lang) for lang in {lang for lang, _ in lang_captions}}
    rows, labels = [], []
    for lang, text in lang_captions:
        cap = tok(" " + text if getattr(processor, "chat_template", None) else text,
                  add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompts[lang] + cap)
        labels.append([-100] * len(prompts[lang]) + cap)
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels])}
