"""The one training loop: ``train(model, data, loss_fn, cfg)`` through ``accelerate``.

Every trainer in excise (LoRA / masked / full fine-tuning, unlearning, distillation, relearning,
pretraining) runs here, so they share one device choice, optimizer (AdamW), scheduler
(``transformers.get_scheduler``), gradient accumulation, clipping, loss gathering,
multi-process data split and checkpointing, and ``accelerate launch`` scales all of them.

**Data.** The global batch of an optimizer step is cut into ``parts = grad_accum_steps x
num_processes`` equal parts; process ``p`` computes micro-batch ``j`` on part ``j * num_processes
+ p``. With a loss that is a mean over the examples of its part, the step's gradient is the
mean over the global batch, so 1 and N processes (and any accumulation) compute the same update.
``data`` is one of:

* a sequence of examples (anything indexable): served as :class:`Examples` with
  ``cfg.batch_size`` and ``cfg.seed`` (seeded shuffled passes); ``loss_fn`` gets a list;
* an :class:`Examples` (to give a ``collate`` function) or any object with
  ``batch(step, part, parts)`` returning part ``part`` of ``parts`` of step ``step`` (0-based);
* a callable ``step -> global batch`` or an iterator of global batches: dicts of tensors (or
  lists) whose first dimension is the batch; every tensor and list is cut along it.

**Checkpoints.** With ``checkpoint_dir`` and ``cfg.checkpoint_every``, every that many steps the
accelerate state (``save_state``: model, optimizer, every process's RNG), the scheduler, the
step and the log are written to ``checkpoint_dir/step-N`` atomically (older ones removed). A
later call with the same directory and config resumes from the newest one (``load_state``),
skipping the batches already seen, so an interrupted and resumed run ends with the same weights
as an uninterrupted one (``tests/test_kill_resume.py`` kills runs after random steps to check).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_scheduler

from excise.errors import ExciseError
from excise.resume import clean_temp, kill_point

STATE_FILE = "train_state.json"


def fast_bf16() -> bool:
    """Whether bfloat16 compute is native here: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX.

    Why: without those, bf16 matmuls on a CPU are emulated -- measured 9x slower than float32 on an
    AVX2-only machine (a 512 x 576 x 1536 matmul, one thread), while an AVX-512 BF16 machine trained the
    knowledge organism 1.8x faster in bf16. Read from the CPU flags, so the answer does not vary run to run."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def requires_grad(model: Any, flag: bool):
    """Set ``requires_grad`` on every parameter for the block, then restore each one's own setting.

    Gradient localizers use it both ways: Fisher needs gradients on every weight, saliency and
    head attribution need none (gradients reach activations only)."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield model
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


class TrainConfig(BaseModel):
    """Settings of the training loop shared by every trainer (AdamW, ``transformers`` schedules)."""

    model_config = {"extra": "forbid"}
    steps: int = Field(20, ge=0, description="optimizer steps (an upper bound when on_step stops early)")
    batch_size: int = Field(8, ge=1, description="global batch: examples per optimizer step over all processes and "
                                                 "accumulation steps (used when data is a sequence of examples)")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (0 keeps masked updates inside the mask)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over this many steps (transformers' convention)")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after warm-up: constant, linear decay to 0, or cosine decay to min_lr")
    min_lr: float = Field(0.0, ge=0, description="cosine only: the learning rate the cosine ends at (capped at lr; "
                                                 "0: decay to 0, transformers' plain cosine)")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (the global batch is cut into them)")
    seed: int = Field(0, description="seeds python, numpy and torch at the start, and the example order")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every this many steps (0: never; "
                                                       "needs a checkpoint_dir)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass instead of keeping them "
                           "(about 1/3 more compute, activation memory per layer down to its input; large models)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="accelerate mixed precision (only when train creates the Accelerator)")


@dataclass
class TrainResult:
    """What a run did: the trained model (unwrapped, eval mode) and one log row per step."""

    model: Any
    log: list[dict]  # per step: step (1-based), loss (mean over processes), lr, tokens, seconds
    n_trainable: int
    n_processes: int
    seconds: float
    resumed_from: int = 0  # the checkpoint step the run resumed from (0: started fresh)
    stopped_early: bool = False

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.log]

    @property
    def tokens(self) -> int:
        return int(sum(r["tokens"] for r in self.log))


# --- data ----------------------------------------------------------------------------------------

class Examples:
    """A finite list served in seeded shuffled passes, ``batch_size`` examples per step (global).

    Step ``s`` takes positions ``s * batch_size ..`` of a permutation order that is the same on
    every process (``torch.randperm`` with a generator seeded by ``seed``, one per pass);
    ``collate(list) -> batch`` turns a part into what ``loss_fn`` takes (default: the list).
    """

    def __init__(self, items: Sequence[Any], batch_size: int, *, collate: Callable[[list], Any] | None = None,
                 seed: int = 0):
        if len(items) == 0:
            raise ExciseError("training needs at least one example")
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self._gen = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def batch(self, step: int, part: int, parts: int) -> Any:
        b = self.batch_size
        if b % parts:
            raise ExciseError(f"batch_size {b} must be divisible by processes x grad_accum_steps = {parts}")
        while len(self._order) < (step + 1) * b:
            self._order += torch.randperm(len(self.items), generator=self._gen).tolist()
        per = b // parts
        chunk = [self.items[i] for i in self._order[step * b + part * per: step * b + (part + 1) * per]]
        return self.collate(chunk) if self.collate is not None else chunk


def shard(batch: Any, part: int, parts: int) -> Any:
    """Part ``part`` of ``parts`` equal slices of a batch along its first dimension (dicts: every tensor/list value)."""
    if parts == 1:
        return batch

    def cut(v: Any, key: str) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() == 0 or not isinstance(v, (torch.Tensor, list, tuple)):
            return v
        n = len(v)
        if n % parts:
            raise ExciseError(f"batch{'.' + key if key else ''} has {n} rows, not divisible by processes x "
                              f"grad_accum_steps = {parts}")
        per = n // parts
        return v[part * per:(part + 1) * per]

    if isinstance(batch, dict):
        return {k: cut(v, k) for k, v in batch.items()}
    return cut(batch, "")


class _Global:
    """Adapts a callable ``step -> batch`` or an iterator of global batches to ``batch(step, part, parts)``."""

    def __init__(self, source: Any):
        self.source, self._seen, self._step, self._cur = source, 0, -1, None
        self._iter = None if callable(source) and not hasattr(source, "__next__") else iter(source)

    def skip(self, n: int) -> None:
        while self._iter is not None and self._seen < n:
            self._next()

    def _next(self) -> Any:
        try:
            b = next(self._iter)
        except StopIteration:
            raise ExciseError(f"training data ran out after {self._seen} batches") from None
        self._seen += 1
        return b

    def batch(self, step: int, part: int, parts: int) -> Any:
        if step != self._step:
            if self._iter is None:
                self._cur = self.source(step)
            else:
                self.skip(step)
                self._cur = self._next()
            self._step = step
        return shard(self._cur, part, parts)


def as_batches(data: Any, cfg: TrainConfig) -> Any:
    """The object train() draws from (see the module doc for the accepted forms)."""
    if hasattr(data, "batch"):
        return data
    if isinstance(data, (dict, torch.Tensor)):
        raise ExciseError("train() needs many batches: a sequence of examples, a callable step -> batch, or an iterator")
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return Examples(data, cfg.batch_size, seed=cfg.seed)
    if callable(data) or hasattr(data, "__iter__"):
        return _Global(data)
    raise ExciseError(f"cannot train on data of type {type(data).__name__}")


def count_tokens(batch: Any) -> int:
    """Real tokens of a dict batch: the sum of every ``*attention_mask`` (0 for other batches)."""
    if not isinstance(batch, dict):
        return 0
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask") and hasattr(v, "sum")))


# --- checkpoints ---------------------------------------------------------------------------------

def latest_checkpoint(directory: str | Path | None) -> Path | None:
    """The newest complete checkpoint (``step-N`` holding ``train_state.json``) in ``directory``."""
    if directory is None or not Path(directory).is_dir():
        return None
    done = [p for p in Path(directory).glob("step-*") if (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def _comparable(cfg: TrainConfig) -> dict:
    # min_lr = 0 is left out so checkpoints written before the setting existed still resume
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in ("checkpoint_every", "gradient_checkpointing") and not (k == "min_lr" and v == 0)}


def _save_checkpoint(acc: Accelerator, directory: Path, step: int, log: list[dict], cfg: TrainConfig,
                     sched: Any) -> None:
    final, tmp = directory / f"step-{step:08d}", directory / f".step-{step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # every process writes its own RNG state
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"format": "excise.train/1", "step": step, "log": log, "config": _comparable(cfg),
                 "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in directory.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(acc: Accelerator, path: Path, cfg: TrainConfig, sched: Any, source: Any) -> tuple[int, list[dict]]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("config") != _comparable(cfg):
        raise ExciseError("the checkpoint was written with other training settings; remove it or use another directory",
                          where=str(path))
    if hasattr(source, "skip"):
        source.skip(int(state["step"]))  # the batches already seen; before the RNG state is restored
    acc.load_state(str(path))
    sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)}
                          if hasattr(sched, "lr_lambdas") else state["scheduler"])
    return int(state["step"]), list(state["log"])


# --- the loop ------------------------------------------------------------------------------------

def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    """``transformers.get_scheduler`` for ``cfg.schedule`` with linear warm-up over ``cfg.warmup_steps``.

    A cosine with ``min_lr`` > 0 ends at ``min_lr`` (``get_cosine_with_min_lr_schedule_with_warmup``)."""
    if cfg.min_lr > 0:
        if cfg.schedule != "cosine":
            raise ExciseError(f"min_lr needs schedule 'cosine', not '{cfg.schedule}'")
        return get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=cfg.warmup_steps,
                                                           num_training_steps=max(cfg.steps, 1),
                                                           min_lr=min(cfg.min_lr, cfg.lr))
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.steps, 1))


def train(model: Any, data: Any, loss_fn: Callable[[Any, Any], torch.Tensor], cfg: TrainConfig | None = None, *,
          params: Iterable[torch.nn.Parameter] | None = None, accelerator: Accelerator | None = None,
          checkpoint_dir: str | Path | None = None, on_step: Callable[[int, Any], bool] | None = None,
          progress: bool = False, desc: str = "train") -> TrainResult:
    """Run ``cfg.steps`` AdamW steps of ``loss_fn(model, batch)`` through ``accelerate``; returns a :class:`TrainResult`.

    ``loss_fn`` gets the prepared (possibly DDP-wrapped) model and one part of a step's batch
    (already on the device) and returns a scalar that is a mean over that part's examples.
    ``params`` restricts the optimizer (default: every parameter that requires grad). The
    Accelerator is created on CPU when the model's weights are on CPU (else accelerate picks
    the device); a given ``accelerator`` is used as is. ``on_step(step, model)`` runs after
    each step (1-based) on the unwrapped model and may return True to stop early (every
    process must call it; any True stops all); a resumed run calls it only for the steps it
    runs, so state that ``on_step`` keeps is the caller's to save. The model is trained in
    place and returned unwrapped in eval mode.
    """
    cfg = cfg or TrainConfig()
    if cfg.checkpoint_every and checkpoint_dir is None:
        raise ExciseError("checkpoint_every needs a checkpoint_dir")
    first = next(iter(model.parameters()), None)
    acc = accelerator or Accelerator(cpu=first is None or first.device.type == "cpu", split_batches=True,
                                     mixed_precision=cfg.mixed_precision)
    source = as_batches(data, cfg)
    set_seed(cfg.seed)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise ExciseError(f"{desc}: the model has no trainable parameter")
    n_trainable = int(sum(p.numel() for p in trainable))
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg)  # stepped here once per optimizer step, whatever the accelerator's settings
    checkpointing = cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable")
    if checkpointing:  # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped, opt = acc.prepare(model, opt)
    start, log = 0, []
    if checkpoint_dir is not None and acc.is_main_process:
        clean_temp(checkpoint_dir, "step-")  # a checkpoint a killed run was writing
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is not None:
        start, log = _load_checkpoint(acc, ckpt, cfg, sched, source)
    k, nproc, pidx = cfg.grad_accum_steps, acc.num_processes, acc.process_index
    scale = acc.gradient_accumulation_steps / k  # acc.backward divides by its own accumulation count
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", leave=False,
               disable=not progress or not acc.is_main_process)
    wrapped.train()
    stopped, t0 = False, time.time()
    for step in range(start, cfg.steps):
        part_losses, tokens = [], 0
        for j in range(k):
            batch = send_to_device(source.batch(step, j * nproc + pidx, k * nproc), acc.device)
            with acc.no_sync(wrapped) if j < k - 1 else contextlib.nullcontext():
                loss = loss_fn(wrapped, batch)
                acc.backward(loss * scale)
            part_losses.append(loss.detach().float().reshape(()))
            tokens += count_tokens(batch)
        stat = torch.stack([torch.stack(part_losses).mean(), torch.tensor(float(tokens), device=acc.device)])
        g = acc.gather(stat.to(acc.device).reshape(1, 2))
        loss_val, n_tok = float(g[:, 0].mean()), int(g[:, 1].sum())
        if not math.isfinite(loss_val):
            raise ExciseError(f"{desc}: loss became {loss_val} at step {step + 1}; lower the learning rate")
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
        lr = float(opt.param_groups[0]["lr"])
        opt.step()
        if not getattr(opt, "step_was_skipped", False):
            sched.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": loss_val, "lr": lr, "tokens": n_tok,
                    "seconds": round(time.time() - t0, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        kill_point(f"train:{desc}:step")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(acc, Path(checkpoint_dir), step + 1, log, cfg, sched)
            kill_point(f"train:{desc}:checkpoint")
        if on_step is not None:
            stop = bool(on_step(step + 1, acc.unwrap_model(wrapped)))
            wrapped.train()
            if nproc > 1:
                stop = bool(acc.gather(torch.tensor([float(stop)], device=acc.device)).max() > 0)
            if stop:
                stopped = True
                break
    bar.close()
    model = acc.unwrap_model(wrapped)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return TrainResult(model=model, log=log, n_trainable=n_trainable, n_processes=nproc,
                       seconds=time.time() - t0, resumed_from=start, stopped_early=stopped)
