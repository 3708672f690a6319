"""Processors of vision-language models, including image-only ones where a video processor cannot be built.

transformers 5 builds video processors only with torchvision, and the processors of Qwen2-VL,
Qwen2.5-VL and SmolVLM refuse to exist without one; image captioning and probing never need it.
"""

from __future__ import annotations

import inspect
from typing import Any

from excise.errors import ExciseError


def image_only_processor(processor_cls: Any) -> Any:
    """``processor_cls`` without its video processor, for Qwen2-VL / SmolVLM when torchvision is absent.

    transformers builds video processors only with torchvision and refuses these processors
    without one; captioning and image probes never need video.
    """
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, **kwargs)

    # transformers reads the sub-processors and the settings it saves off the __init__ signature, and
    # the settings it loads back off validate_init_kwargs
    sig = inspect.signature(processor_cls.__init__)
    __init__.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "video_processor"])
    names = tuple(n for n in sig.parameters if n not in ("self", "video_processor"))

    def validate_init_kwargs(processor_config, valid_kwargs):
        return processor_cls.validate_init_kwargs(processor_config, names)

    # the same name, so a saved processor_config.json still names the family's processor class
    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": processor_cls.__module__,
                                                           "validate_init_kwargs": staticmethod(validate_init_kwargs)})


def vlm_processor(source: str, config: Any, common: dict) -> Any:
    """The family's processor; an image-only one where only its video processor cannot be loaded."""
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(source, **common)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))
        # no torchvision, or a directory saved without a video processor: load the image side only
        if "video" not in str(e).lower() or not name:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExciseError(f"cannot load the processor of '{source}' ({first[:160]})") from None
    return image_only_processor(getattr(transformers, name)).from_pretrained(source, **common)
