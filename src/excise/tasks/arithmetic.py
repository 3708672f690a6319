"""Arithmetic task for robust unlearning (the UNDO setting, arXiv 2506.06278).

Items are equations (``12 * 7 = 84``) and templated word problems for + - * /. Addition and
subtraction draw operands from 1-50 (subtraction keeps a >= b so answers are non-negative);
multiplication and division draw operands from 1-20 and division is exact
(``(a*b) / b = a``). forget = multiplication and division, retain = addition and subtraction.

Why the split is by *string*: the skill to forget is the memorised operation, so every fact
recurs in many surface forms; an item belongs to the evaluation pool when a stable hash of its
prompt says so, and training samples are drawn only from the other strings. Eval strings are
therefore never seen in training, while the facts they ask about are.

The small decoder that learns this mix is built here from a Llama- or Gemma-style config with a
word/digit-level tokenizer (:class:`WordDigitTokenizer`), pretrained by :func:`pretrain` through
``accelerate`` and cached, seeded, under ``excise.models.defaults.cache_dir()``.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from pydantic import BaseModel, Field

from excise.errors import ExciseError, where
from excise.testing import ByteTokenizer

OPS = ("add", "sub", "mul", "div")
FORGET_OPS = ("mul", "div")
RETAIN_OPS = ("add", "sub")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
RANGES = {"add": (1, 50), "sub": (1, 50), "mul": (1, 20), "div": (1, 20)}

NAMES = ("tom", "ana", "lee", "sam", "mia", "ben", "eva", "max", "zoe", "kai", "ivy", "leo")
OBJECTS = ("apples", "pens", "coins", "books", "cards", "shells", "cups", "stones")
# {a} {b} are the operands as written; {n} a name, {o} an object
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("what is {a} plus {b}? ", "{n} has {a} {o} and gets {b} more. how many {o} now? "),
    "sub": ("what is {a} minus {b}? ", "{n} has {a} {o} and gives away {b}. how many {o} left? "),
    "mul": ("what is {a} times {b}? ", "{n} has {a} bags of {b} {o}. how many {o} in all? "),
    "div": ("what is {a} divided by {b}? ", "{n} splits {a} {o} into {b} equal piles. how many {o} per pile? "),
}
EVAL_FRACTION = 0.1  # share of prompt strings reserved for evaluation (by stable hash)


@dataclass(frozen=True)
class Item:
    """One question: ``prompt`` ends right before the answer; ``text`` is what a model trains on."""

    prompt: str
    answer: int
    op: str
    kind: str = "equation"  # equation | question | word

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}."

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "op": self.op, "kind": self.kind}


def facts(op: str) -> list[tuple[int, int, int]]:
    """All (a, b, answer) facts of one operation."""
    lo, hi = RANGES[op]
    out = []
    for x in range(lo, hi + 1):
        for y in range(lo, hi + 1):
            if op == "add":
                out.append((x, y, x + y))
            elif op == "sub":
                if x >= y:
                    out.append((x, y, x - y))
            elif op == "mul":
                out.append((x, y, x * y))
            else:  # exact division: (x*y) / y = x
                out.append((x * y, y, x))
    return out


_FACTS: dict[str, list[tuple[int, int, int]]] = {}


def _facts(op: str) -> list[tuple[int, int, int]]:
    if op not in _FACTS:
        _FACTS[op] = facts(op)
    return _FACTS[op]


def is_eval_string(prompt: str) -> bool:
    """Stable membership of a prompt string in the evaluation pool (crc32, not Python's salted hash)."""
    return (zlib.crc32(prompt.encode("utf-8")) % 1000) < int(EVAL_FRACTION * 1000)


def render(op: str, a: int, b: int, kind: str, rng: random.Random) -> str:
    if kind == "equation":
        return f"{a} {SYMBOL[op]} {b} = "
    tpl = TEMPLATES[op][0 if kind == "question" else 1]
    return tpl.format(a=a, b=b, n=rng.choice(NAMES), o=rng.choice(OBJECTS))


KIND_WEIGHTS = (("equation", 0.5), ("question", 0.25), ("word", 0.25))


def sample_item(op: str, rng: random.Random, split: Literal["train", "eval"]) -> Item:
    """Draw one item of ``op`` whose prompt string belongs to ``split``."""
    if op not in OPS:
        raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}")
    kinds, weights = zip(*KIND_WEIGHTS)
    for _ in range(10_000):
        a, b, c = rng.choice(_facts(op))
        kind = rng.choices(kinds, weights)[0]
        prompt = render(op, a, b, kind, rng)
        if is_eval_string(prompt) == (split == "eval"):
            return Item(prompt, c, op, kind)
    raise RuntimeError("could not draw an item from the requested split")  # pragma: no cover


def eval_items(ops: Sequence[str], n_per_op: int, seed: int = 0) -> list[Item]:
    """A fixed evaluation set: ``n_per_op`` distinct held-out prompts per operation."""
    rng = random.Random(f"eval-{seed}")
    out: list[Item] = []
    for op in ops:
        seen: set[str] = set()
        while len(seen) < n_per_op:
            it = sample_item(op, rng, "eval")
            if it.prompt not in seen:
                seen.add(it.prompt)
                out.append(it)
    return out


def train_stream(ops: Sequence[str], seed: int) -> Iterator[Item]:
    """An endless seeded stream of training items, operations drawn uniformly."""
    if not ops:
        raise ExciseError("a training stream needs at least one operation")
    for op in ops:
        if op not in OPS:
            raise ExciseError(f"unknown operation '{op}'; choose one of {', '.join(OPS)}")
    rng = random.Random(f"train-{seed}")
    ops = list(ops)
    while True:
        yield sample_item(rng.choice(ops), rng, "train")


def train_items(ops: Sequence[str], n: int, seed: int) -> list[Item]:
    it = train_stream(ops, seed)
    return [next(it) for _ in range(n)]


# --- user data files ----------------------------------------------------------------------

def load_items(path: str | Path, *, required_ops: Sequence[str] | None = None) -> list[Item]:
    """Read JSONL rows ``{"prompt": str, "answer": int, "op": str (optional)}``.

    Every bad row fails with ``file:line:field``. ``op`` defaults to ``"custom"``; when
    ``required_ops`` is given every row's op must be one of them.
    """
    from excise.io import iter_jsonl

    path = Path(path)
    items: list[Item] = []
    for i, row in iter_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ExciseError("missing or empty string", where=where(path, i, "prompt"))
        ans = row.get("answer")
        if isinstance(ans, bool) or not isinstance(ans, (int, str)) or not str(ans).lstrip("-").isdigit():
            raise ExciseError("answer must be an integer", where=where(path, i, "answer"))
        op = row.get("op", "custom")
        if not isinstance(op, str):
            raise ExciseError("op must be a string", where=where(path, i, "op"))
        if required_ops is not None and op not in required_ops:
            raise ExciseError(f"op '{op}' not allowed here; expected one of {', '.join(required_ops)}", where=where(path, i, "op"))
        unknown = set(row) - {"prompt", "answer", "op", "kind"}
        if unknown:
            raise ExciseError("unknown field", where=where(path, i, sorted(unknown)[0]))
        items.append(Item(prompt, int(ans), op, str(row.get("kind", "custom"))))
    if not items:
        raise ExciseError("no items in file", where=str(path))
    return items


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
        from excise.io import atomic_write_json

        atomic_write_json(Path(directory) / self.FILE, {"vocab": self.vocab, "vocab_size": self.vocab_size})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "WordDigitTokenizer":
        from excise.io import read_json

        d = read_json(Path(directory) / cls.FILE)
        return cls(d["vocab"], d["vocab_size"])


# --- the small decoder --------------------------------------------------------------------

class ArithModelConfig(BaseModel):
    """Architecture of the small decoder excise pretrains on the arithmetic mix."""

    model_config = {"extra": "forbid"}
    family: Literal["llama", "gemma"] = Field("llama", description="Llama- or Gemma-style decoder config")
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
    eval_n_per_op: int = Field(200, ge=1, description="held-out items per operation for the final accuracy")
    log_every: int = Field(250, ge=0, description="record held-out accuracy (probe items) every this many steps; 0: never")
    probe_n_per_op: int = Field(50, ge=1, description="held-out items per operation of the learning-curve probe")
    target_accuracy: float | None = Field(0.95, gt=0, le=1, description="stop early once every trained operation reaches this probe accuracy (None: run all steps)")


def build_model(arch: ArithModelConfig, vocab_size: int, seed: int) -> Any:
    """A randomly initialised decoder from a config (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch.d_model % arch.n_heads:
        raise ExciseError(f"d_model {arch.d_model} is not divisible by n_heads {arch.n_heads}")
    common = dict(hidden_size=arch.d_model, intermediate_size=arch.d_mlp, num_hidden_layers=arch.n_layers,
                  num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_heads, vocab_size=vocab_size,
                  max_position_embeddings=arch.max_len, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True)
    if arch.family == "gemma":
        common["head_dim"] = arch.d_model // arch.n_heads
    cfg = AutoConfig.for_model(arch.family, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def config_key(cfg: PretrainConfig) -> str:
    """A short stable hash of a pretraining config: the cache directory name."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return f"{zlib.crc32(blob.encode()):08x}"


def cache_path(cfg: PretrainConfig, name: str) -> Path:
    from excise.models.defaults import cache_dir

    return cache_dir() / "arith" / f"{name}-{config_key(cfg)}"


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, name: str = "base", progress: bool = False) -> Path:
    """Pretrain (or reuse from the cache) a small decoder on the mix; returns its directory.

    The directory holds a Hugging Face model (safetensors), ``char_tokenizer.json`` and
    ``pretrain.json`` (config, accuracy per operation, steps, seconds). Same config -> same
    weights on CPU.
    """
    import time

    import torch

    from excise.lm import lm_batch
    from excise.io import atomic_dir, atomic_write_json
    from excise.measure.arithmetic import accuracy_by_op
    from excise.run import seed_everything
    from excise.train import TrainConfig, train

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
    probe = eval_items(OPS, cfg.probe_n_per_op, seed=cfg.seed + 500)
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
    with atomic_dir(target) as tmp:
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
    from excise.models.load import from_model, load

    p = Path(path)
    if (p / WordDigitTokenizer.FILE).exists():
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

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
