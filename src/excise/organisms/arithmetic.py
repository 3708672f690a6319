"""The arithmetic model organism of the UNDO workflow: tokenizer, architecture, pretraining, cache.

A small decoder built from a Llama- or Gemma-style config with a word/digit-level tokenizer
(:class:`WordDigitTokenizer`) learns the four operations of :mod:`excise.tasks.arithmetic`; it is
pretrained by :func:`pretrain` through :func:`excise.train.train` and cached, seeded, under
``excise.models.defaults.cache_dir()``. The data and prompts stay in ``excise.tasks``.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from excise.errors import ExciseError
from excise.io import atomic_write_json, read_json, shared_dir
from excise.lm import lm_batch
from excise.measure.arithmetic import accuracy_by_op
from excise.models.defaults import cache_dir
from excise.models.load import from_model, load
from excise.run import seed_everything
from excise.tasks.arithmetic import NAMES, OBJECTS, OPS, TEMPLATES, eval_items, train_stream
from excise.testing import ByteTokenizer
from excise.train import TrainConfig, train


# --- tokenizer ------------------------------------------------------------------------------

WORDS = tuple(sorted({w for tpls in TEMPLATES.values() for t in tpls
                      for w in re.findall(r"[a-z]+", re.sub(r"\{\w\}", " ", t))}
                     | set(NAMES) | set(OBJECTS)))
SYMBOLS = tuple("+-*/=?.,'")
MAX_NUMBER = 999  # number-level tokenizer: every integer 0..999 is one token


class WordDigitTokenizer(ByteTokenizer):
    """Word-level for words; digit-level numbers, or (``numbers=True``) one token per integer 0..999.

    pad 0, bos 1, eos 2, unk 3, then the vocabulary. Why not characters: whole-word tokens make
    word problems 3-4x shorter, and number tokens turn each fact into one next-token
    prediction, which is what lets a shared CPU pretrain the model in minutes.
    Same call API as :class:`excise.testing.ByteTokenizer`; spaces are not tokens; text is
    lower-cased; unknown words map to ``unk``. Saved next to the model as ``arith_tokenizer.json``.
    """

    FILE = "arith_tokenizer.json"
    unk_token_id = 3
    _SPLIT = re.compile(r"\d|[a-z]+|[^\sa-z\d]")

    def __init__(self, vocab: Sequence[str] | None = None, vocab_size: int | None = None, numbers: bool = False):
        if vocab is None:
            digits = [str(i) for i in range(MAX_NUMBER + 1)] if numbers else list("0123456789")
            vocab = digits + list(SYMBOLS) + list(WORDS)
        self.vocab = list(vocab)
        self.numbers = "10" in self.vocab
        if self.numbers:
            self._SPLIT = re.compile(r"\d+|[a-z]+|[^\sa-z\d]")
        self.index = {w: i + 4 for i, w in enumerate(self.vocab)}
        super().__init__(vocab_size or len(self.vocab) + 4)
        if self.vocab_size < len(self.vocab) + 4:
            raise ExciseError(f"vocab_size {self.vocab_size} is smaller than the vocabulary + 4 special tokens")

    def tokenize(self, text: str) -> list[str]:
        return self._SPLIT.findall(text.lower())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.index.get(w, self.unk_token_id) for w in self.tokenize(text)]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out: list[str] = []
        prev_digit = False
        for i in ids:
            if 4 <= i < 4 + len(self.vocab):
                w = self.vocab[i - 4]
            elif i == self.unk_token_id and not skip_special_tokens:
                w = "<unk>"
            else:
                continue
            digit = w.isdigit() and not self.numbers
            out.append(w if (not out or (digit and prev_digit)) else " " + w)
            prev_digit = digit
        return "".join(out)

    def save_pretrained(self, directory: str | Path) -> None:

        atomic_write_json(Path(directory) / self.FILE, {"vocab": self.vocab, "vocab_size": self.vocab_size})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "WordDigitTokenizer":

        d = read_json(Path(directory) / cls.FILE)
        return cls(d["vocab"], d["vocab_size"])


# --- the small decoder --------------------------------------------------------------------

class ArithModelConfig(BaseModel):
    """Architecture of the small decoder excise pretrains on the arithmetic mix."""

    model_config = {"extra": "forbid"}
    family: Literal["llama", "gemma", "gemma2"] = Field(
        "llama", description="Llama-, Gemma- or Gemma-2-style decoder config (UNDO's paper uses Gemma-2)")
    n_layers: int = Field(2, ge=1, le=24, description="transformer blocks")
    d_model: int = Field(64, ge=16, le=2048, description="hidden size")
    n_heads: int = Field(4, ge=1, description="attention heads (head_dim = d_model / n_heads)")
    d_mlp: int = Field(256, ge=16, description="MLP hidden width")
    max_len: int = Field(64, ge=32, description="maximum sequence length in tokens")
    tokenizer: Literal["number", "digit"] = Field("number", description="numbers as one token each (0..999) or digit by digit")


class PretrainConfig(BaseModel):
    """Pretraining on the arithmetic mix (defaults reach >= 90% per operation in minutes on 2 CPU cores)."""

    model_config = {"extra": "forbid"}
    arch: ArithModelConfig = Field(default_factory=ArithModelConfig, description="model architecture")
    ops: list[str] = Field(default_factory=lambda: list(OPS), description="operations in the mix (the oracle drops mul and div)")
    steps: int = Field(4000, ge=1, description="optimizer steps (an upper bound: see target_accuracy)")
    batch_size: int = Field(64, ge=1, description="sequences per step")
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup: int = Field(100, ge=0, description="warm-up steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    seed: int = Field(0, description="seed of initialisation and data order")
    eval_n_per_op: int = Field(200, ge=1, description="test-pool items per operation for the final accuracy")
    log_every: int = Field(250, ge=0, description="record held-out accuracy (probe items) every this many steps; 0: never")
    probe_n_per_op: int = Field(50, ge=1, description="dev-pool items per operation of the learning-curve probe (it drives early stopping)")
    target_accuracy: float | None = Field(0.95, gt=0, le=1, description="stop early once every trained operation reaches this probe accuracy (None: run all steps)")


def build_model(arch: ArithModelConfig, vocab_size: int, seed: int) -> Any:
    """A randomly initialised decoder from a config (seeded)."""

    if arch.d_model % arch.n_heads:
        raise ExciseError(f"d_model {arch.d_model} is not divisible by n_heads {arch.n_heads}")
    common = dict(hidden_size=arch.d_model, intermediate_size=arch.d_mlp, num_hidden_layers=arch.n_layers,
                  num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_heads, vocab_size=vocab_size,
                  max_position_embeddings=arch.max_len, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True)
    if arch.family in ("gemma", "gemma2"):
        common["head_dim"] = arch.d_model // arch.n_heads
    cfg = AutoConfig.for_model(arch.family, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


DATA_VERSION = 2  # 2: the pretraining probe draws from the dev pool (1: from the held-out strings results used)


def config_key(cfg: PretrainConfig) -> str:
    """A short stable hash of a pretraining config and the data version: the cache directory name."""
    blob = json.dumps({**cfg.model_dump(mode="json"), "data_version": DATA_VERSION}, sort_keys=True)
    return f"{zlib.crc32(blob.encode()):08x}"


def cache_path(cfg: PretrainConfig, name: str) -> Path:

    return cache_dir() / "arith" / f"{name}-{config_key(cfg)}"


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, name: str = "base", progress: bool = False) -> Path:
    """Pretrain (or reuse from the cache) a small decoder on the mix; returns its directory.

    The directory holds a Hugging Face model (safetensors), ``char_tokenizer.json`` and
    ``pretrain.json`` (config, accuracy per operation, steps, seconds). Same config -> same
    weights on CPU.
    """

    target = Path(out_dir) if out_dir is not None else cache_path(cfg, name)
    if (target / "pretrain.json").exists():
        return target
    for op in cfg.ops:
        if op not in OPS:
            raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}", where="pretrain:ops")
    seed_everything(cfg.seed)
    tok = WordDigitTokenizer(numbers=cfg.arch.tokenizer == "number")
    model = build_model(cfg.arch, tok.vocab_size, cfg.seed)
    stream = train_stream(cfg.ops, cfg.seed)

    def batches():
        while True:
            items = [next(stream) for _ in range(cfg.batch_size)]
            yield lm_batch(tok, [it.text for it in items], max_length=cfg.arch.max_len)

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    curve: list[dict] = []
    probe = eval_items(OPS, cfg.probe_n_per_op, seed=cfg.seed, pool="dev")  # early stop tunes: never the test pool
    t0, c0 = time.time(), time.process_time()

    def on_step(step: int, m: Any) -> bool:
        if cfg.log_every and step % cfg.log_every == 0:
            acc = accuracy_by_op(m, tok, probe)
            curve.append({"step": step, "seconds": round(time.time() - t0, 1),
                          **{op: round(acc[op].value, 3) for op in OPS}})
            if progress:
                print(f"pretrain {name} step {step}: {curve[-1]}", flush=True)
            if cfg.target_accuracy is not None and all(curve[-1][op] >= cfg.target_accuracy for op in cfg.ops):
                return True
        return False

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
                       schedule="cosine", batch_size=cfg.batch_size, seed=cfg.seed)
    log = train(model, batches(), loss_fn, tcfg, progress=False, desc=f"pretrain {name}", on_step=on_step).log
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    model.eval()
    acc = accuracy_by_op(model, tok, eval_items(OPS, cfg.eval_n_per_op, seed=cfg.seed))
    with shared_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", {
            "config": cfg.model_dump(mode="json"), "name": name, "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1), "steps_run": len(log), "curve": curve,
            "final_loss": log[-1]["loss"] if log else None,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "tokens_seen": int(sum(r["tokens"] for r in log)),
            "accuracy": {op: e.as_dict() for op, e in acc.items()},
            "torch_threads": torch.get_num_threads(),
        })
    return target


def load_model(path: str | Path, *, device: str = "cpu") -> Any:
    """Load a model directory as a handle: excise arithmetic models (char tokenizer) or any HF decoder."""

    p = Path(path)
    if (p / WordDigitTokenizer.FILE).exists():
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per tiny model is noise
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="eager").to(device)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        h = from_model(model, WordDigitTokenizer.from_pretrained(p), name=p.name)
        h.source = str(p)
        return h
    return load(str(path), device=device)
