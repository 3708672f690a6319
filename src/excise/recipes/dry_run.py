"""`excise run RECIPE --dry-run`: every stage of a recipe on a tiny random model of the same family.

A seed-scale recipe names a hub model this machine may not have (and could not hold). The dry run
builds a model of the same architecture family from the model's config (:mod:`excise.recipes.plan`
resolves it offline), shrunk to a few layers of width 64, random weights, with a byte-level
tokenizer that encodes any text (and a chat template, so instruct-style prompts work), saves it
once under the excise cache, points the recipe at it, and runs the recipe's ``--quick`` variant on
CPU. What it proves: the recipe validates, every stage runs through the real code path for that
family, and the outputs are written, in seconds. What it does not: any figure about the real model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from excise.errors import ExciseError
from excise.io import atomic_dir
from excise.models.defaults import cache_dir
from excise.recipes.plan import ENCODER_TYPES, resolve_config
from excise.run import is_main_process, wait_for_everyone
from excise.testing import CAPTION_FAMILIES, tiny_captioner, tiny_vlm

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (every UTF-8 byte is a token, no merges): encodes any text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>",
                                  eos_token="<|eos|>", unk_token="<|unk|>",
                                  additional_special_tokens=list(SPECIALS[4:]))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def shrink(config: Any, vocab_size: int) -> Any:
    """The same family's config at width 64 and 2 layers; grouped-query ratio kept."""
    heads = int(getattr(config, "num_attention_heads", 4) or 4)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    upd = dict(TINY, vocab_size=vocab_size)
    if hasattr(config, "num_key_value_heads"):
        upd["num_key_value_heads"] = max(1, 4 * kv // heads)
    if getattr(config, "head_dim", None):
        upd["head_dim"] = 16
    upd.update(pad_token_id=SPECIALS.index("<|pad|>"), bos_token_id=SPECIALS.index("<|bos|>"),
               eos_token_id=SPECIALS.index("<|eos|>"))
    if getattr(config, "max_position_embeddings", 0):
        upd["max_position_embeddings"] = min(int(config.max_position_embeddings), 2048)
    base = config.to_dict()
    if base.get("layer_types"):  # per-layer attention kinds (sliding / full): keep the first layers'
        upd["layer_types"] = base["layer_types"][: TINY["num_hidden_layers"]]
    return config.__class__.from_dict({**base, **upd})


def tiny_like(model: str) -> Path:
    """A saved tiny random model of ``model``'s family (cached: built once per model name)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model)
    target = cache_dir() / "dry_run" / slug
    if is_main_process() and not (target / "config.json").exists():
        _build_tiny(model, target)
    wait_for_everyone()  # under `accelerate launch` the main process builds, the others wait for it
    return target


def _build_tiny(model: str, target: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = resolve_config(model)
    if hasattr(config, "vision_config"):
        with atomic_dir(target) as tmp:
            family = config.model_type if config.model_type in CAPTION_FAMILIES else "llava"
            h = tiny_captioner(family) if family in CAPTION_FAMILIES else tiny_vlm(config.model_type)
            h.model.save_pretrained(tmp)
            h.processor.save_pretrained(tmp)
        return
    tok = byte_tokenizer()
    cfg = shrink(config, len(tok))
    torch.manual_seed(0)
    auto = AutoModel if config.model_type in ENCODER_TYPES else AutoModelForCausalLM
    m = auto.from_config(cfg)
    with atomic_dir(target) as tmp:
        m.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def dry_run_settings(workflow: str, settings: dict) -> dict:
    """The recipe's settings with its model replaced by a tiny one of the same family, on CPU."""
    s = dict(settings)
    s.pop("plan", None)
    if workflow in ("bbq", "concept", "fair", "captions") and s.get("model") not in (None, "organism", "planted"):
        s["model"] = str(tiny_like(s["model"]))
    if workflow == "bbq" and s.get("model") == "biased":  # an organism of a tiny base, two steps
        b = dict(s.get("biased") or {})
        s["biased"] = {**b, "base": str(tiny_like(b.get("base", "smollm2-135m-instruct"))), "steps": 2}
    if workflow in ("bbq", "concept", "fair", "captions"):
        s["device"] = "cpu"
        if "dtype" in s:
            s["dtype"] = "float32"
    if workflow == "bbq":  # a 2-layer, 4-head model has 8 heads
        s["select"] = {**(s.get("select") or {}), "k": min(int((s.get("select") or {}).get("k", 3)), 3)}
        s["localize"] = {**(s.get("localize") or {}), "n_candidates": 4}
    if workflow == "concept":
        s["screen"] = False  # a random model knows nothing to screen for
        s["select"] = {**(s.get("select") or {}), "k": 16}  # 2 layers x 128 MLP neurons
    if workflow == "captions":
        s["data"] = None  # the synthetic scenes stand in for the user's folder
    if workflow == "undo":
        arch = dict((s.get("pretrain") or {}).get("arch") or {})
        arch.update(n_layers=2, d_model=64, n_heads=4, d_mlp=128)
        s["pretrain"] = {**(s.get("pretrain") or {}), "arch": arch, "steps": 20, "batch_size": 16,
                         "target_accuracy": None}
        s["distill"] = {**(s.get("distill") or {}), "max_steps": 10, "batch_size": 16}
        s["methods"] = {"maxent": {"method": "maxent", "steps": 3, "batch_size": 8}}  # one method, a few steps
        s["undo_from"] = "maxent"
        s["relearn"] = {**(s.get("relearn") or {}), "lrs": [1e-3], "steps": 4, "eval_every": 2, "eval_n_per_op": 5}
    if workflow not in ("bbq", "concept", "fair", "captions", "undo"):
        raise ExciseError(f"--dry-run supports the workflows bbq, concept, fair, captions and undo, not '{workflow}'")
    return s
