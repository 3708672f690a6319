"""Runs: an output directory with a config snapshot, one folder per stage, metrics, resume.

* ``config.json`` is the resolved config; re-running with a different config is refused unless
  ``force`` (which clears the old run when the first stage starts).
* Each stage is built in a temporary folder and moved into place when it finishes, so a crash
  leaves no half-written stage; a finished stage (``stage.json`` present) is skipped on re-run.
* Metrics are written as ``metrics.json`` and ``metrics.csv`` beside the stage's other outputs.
* A long stage keeps resumable pieces in ``.checkpoints/<stage>`` (:mod:`excise.resume`,
  :mod:`excise.train`), removed when the stage finishes; what a killed run left half-written
  (``.*.tmp``) is removed when a stage starts. A run directory has one writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from excise.errors import ExciseError
from excise.io import _nan_to_none, _plain, atomic_dir, atomic_write_csv, atomic_write_json, check_out_dir, read_json
from excise.processes import is_main_process, wait_for_everyone, world_size
from excise.resume import clean_temp, kill_point


def seed_everything(seed: int) -> None:
    """One seed for python, numpy and torch, so CPU runs with the same seed give the same numbers."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    except ImportError:  # pragma: no cover
        pass


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("excise", "torch", "transformers", "peft", "accelerate", "numpy", "safetensors"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            pass
    return out


def _git() -> dict[str, Any]:
    """The commit of the excise checkout that ran this (None outside a git checkout), so a result can be traced to code."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def _seeds(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every setting named seed/seeds in the config, by dotted path (the run's sources of randomness)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_seeds(v, key + "."))
        elif str(k).endswith(("seed", "seeds")):
            out[key] = v
    return out


def _torch_threads() -> int | None:
    """torch's CPU thread count if torch is loaded (never imports it: a run without torch records None)."""
    torch = sys.modules.get("torch")
    try:
        return int(torch.get_num_threads()) if torch is not None else None
    except Exception:  # pragma: no cover - a half-imported torch
        return None


def write_metrics(directory: str | Path, metrics: Mapping[str, Any] | list[Mapping[str, Any]], name: str = "metrics") -> None:
    """Write metrics as JSON and CSV. A dict of scalars becomes (metric, value) rows; nested dicts are flattened."""
    directory = Path(directory)
    atomic_write_json(directory / f"{name}.json", metrics)
    if isinstance(metrics, list):
        rows = [_flatten(r) if isinstance(r, Mapping) else r for r in metrics]
    else:
        rows = [{"metric": k, "value": v} for k, v in _flatten(metrics).items()]
    atomic_write_csv(directory / f"{name}.csv", rows)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        v = _plain(v)  # an Estimate becomes {value, lo, hi, n, method}; arrays become lists
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(_nan_to_none(v))
        else:
            out[key] = v
    return out


def _run_elsewhere(fn: Callable[[Path], Any]) -> Any:
    with tempfile.TemporaryDirectory(prefix="excise-rank-") as tmp:
        return fn(Path(tmp))


@dataclass
class StageResult:
    name: str
    dir: Path
    metrics: Any
    skipped: bool


class Run:
    """An output directory for one configured run of a workflow.

    The constructor only checks the directory (same config -> resume; different or corrupt ->
    ExciseError unless ``force``). The directory, ``config.json`` and ``run.json`` are created
    when the first stage starts (or on :meth:`start`), and ``force`` clears an old run only then,
    so bad input found between constructing the run and its first stage leaves nothing behind.
    The old run is moved aside, not deleted, until the first stage finishes: bad input found
    inside that stage (an ExciseError) puts it back unchanged.
    """

    CONFIG = "config.json"

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any], *, force: bool = False):
        self.dir = Path(out_dir)
        # resolved, JSON-normal form (NaN -> null, so a config with NaN still resumes)
        self.config = json.loads(json.dumps(_nan_to_none(dict(config)), default=str))
        self._clear_first = False
        self._old: Path | None = None  # a forced run's predecessor, moved aside until the first stage is done
        if not is_main_process():  # launched processes other than the main one never write the run directory
            self._started = True
            return
        cfg_path = self.dir / self.CONFIG
        check_out_dir(self.dir)
        if self.dir.exists() and any(self.dir.iterdir()):
            if not cfg_path.exists():
                if not force:
                    raise ExciseError(
                        f"output directory {self.dir} is not empty and holds no {self.CONFIG}; "
                        "choose another --out or pass --force"
                    )
                self._clear_first = True
            else:
                try:
                    old = read_json(cfg_path)
                    if not isinstance(old, dict):
                        raise ExciseError("not a mapping")
                except ExciseError:
                    if not force:
                        raise ExciseError(f"corrupt run directory: {cfg_path} is not a valid config snapshot; pass --force to start over") from None
                    old = None
                if old != self.config:
                    if not force:
                        changed = sorted(k for k in set(old or {}) | set(self.config) if (old or {}).get(k) != self.config.get(k))
                        raise ExciseError(
                            f"{self.dir} holds a run with a different config (differs in: {', '.join(changed[:5])}); "
                            "pass --force to overwrite or choose another --out"
                        )
                    self._clear_first = True
        self._started = cfg_path.exists() and not self._clear_first

    def start(self) -> "Run":
        """Create the directory with its config snapshot (clearing an old run if ``force`` asked to)."""
        if self._started:
            return self
        if self._clear_first and self.dir.exists():
            self._old = self.dir.with_name(f".{self.dir.name}.replaced.tmp")
            shutil.rmtree(self._old, ignore_errors=True)
            os.replace(self.dir, self._old)
        self._clear_first = False
        missing = [p for p in (self.dir, *self.dir.parents) if not p.exists()]
        self._created = {"dir": missing[-1] if missing else None}  # the topmost folder start() makes
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / self.CONFIG, self.config)
        atomic_write_json(self.dir / "run.json", {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(), "git": _git(),
            "seeds": _seeds(self.config), "torch_threads": _torch_threads(), "processes": world_size(),
            "platform": {"system": platform.system(), "machine": platform.machine(), "cpus": os.cpu_count()},
            "stages": {}})
        self._started = True
        return self

    def _unstart(self) -> None:
        """Undo :meth:`start` (the directory if it made it, else the two files it wrote)."""
        if self._created.get("dir") is not None:
            shutil.rmtree(self._created["dir"], ignore_errors=True)
        else:
            for f in (self.CONFIG, "run.json"):
                (self.dir / f).unlink(missing_ok=True)
            shutil.rmtree(self.dir / ".checkpoints", ignore_errors=True)
        self._started = False

    def stage_dir(self, name: str) -> Path:
        return self.dir / name

    def checkpoint_dir(self, name: str) -> Path:
        """Where a stage keeps resumable checkpoints (``excise.train``, ``excise.resume.Points``): outside
        the stage's temporary folder, so a killed run resumes mid-stage; removed once the stage is done."""
        return self.dir / ".checkpoints" / name

    def _drop_checkpoints(self, name: str) -> None:
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.dir / ".checkpoints").rmdir()  # only when no other stage keeps checkpoints

    def is_done(self, name: str) -> bool:
        return not self._clear_first and (self.stage_dir(name) / "stage.json").exists()

    def run_stages(self, stages: Sequence[tuple[str, Callable[[Path], Any]]], *, say: Callable[[str], None] | None = None,
                   stop_after: str | None = None) -> dict[str, Any]:
        """Run (or resume) named stages in order, up to and including ``stop_after``; their metrics by name."""
        out: dict[str, Any] = {}
        for name, fn in stages:
            if say is not None:
                say(f"[{name}]")
            out[name] = self.stage(name, fn).metrics
            if name == stop_after:
                break
        return out

    def stage(self, name: str, fn: Callable[[Path], Any]) -> StageResult:
        """Run ``fn(tmp_dir) -> metrics`` unless the stage already finished; return its metrics.

        ``fn`` writes its outputs into the directory it is given; the directory becomes
        ``<run>/<name>/`` only if ``fn`` returns without raising.
        """
        final = self.stage_dir(name)
        done = self.is_done(name)
        # every process looks before the main one writes: a process that looked after the main one had
        # finished the stage would skip it, one barrier short, and read later stages' files too early
        wait_for_everyone()
        if done:
            info = read_json(final / "stage.json")
            metrics = read_json(final / "metrics.json") if (final / "metrics.json").exists() else None
            if not isinstance(info, dict) or info.get("status") != "done":
                raise ExciseError(f"corrupt run directory: {final / 'stage.json'} has no status 'done'; pass --force")
            if is_main_process():  # a run killed between finishing a stage and tidying up
                clean_temp(self.dir)
                if self.checkpoint_dir(name).exists():
                    self._drop_checkpoints(name)
            return StageResult(name, final, metrics, skipped=True)
        if not is_main_process():
            # under `accelerate launch` every process runs the stage (training needs them all), only
            # the main one writes the run directory; the others write into a scratch folder
            metrics = _run_elsewhere(fn)
            wait_for_everyone()
            return StageResult(name, final, metrics, skipped=False)
        first = not self._started
        self.start()
        clean_temp(self.dir)  # stages, run.json or a report a killed run left half-written
        if self._old is None:  # a forced run's predecessor a killed run left moved aside
            clean_temp(self.dir.parent, f"{self.dir.name}.replaced")
        t0, c0 = time.time(), time.process_time()
        try:
            with atomic_dir(final) as tmp:
                metrics = fn(tmp)
                if metrics is not None:
                    write_metrics(tmp, metrics)
                timing = {"seconds": round(time.time() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3),
                          "torch_threads": _torch_threads()}
                atomic_write_json(tmp / "stage.json", {"status": "done", **timing})
        except ExciseError:
            if first:  # bad input found inside the first stage: leave no half-started run behind
                self._unstart()
                if self._old is not None:  # and put a forced run's predecessor back as it was
                    os.replace(self._old, self.dir)
                    self._old = None
            raise
        finally:
            if self._old is not None:  # the first stage finished (or failed for another reason): the new run stays
                shutil.rmtree(self._old, ignore_errors=True)
                self._old = None
        kill_point(f"stage:{name}")
        wait_for_everyone()  # the other processes may still read the stage's checkpoints
        self._drop_checkpoints(name)
        self._record_stage(name, timing)
        return StageResult(name, final, metrics, skipped=False)

    def _record_stage(self, name: str, timing: Mapping[str, Any]) -> None:
        """Add a finished stage's wall and CPU seconds to run.json (the report's provenance reads them)."""
        path = self.dir / "run.json"
        try:
            info = read_json(path) if path.exists() else {}
        except ExciseError:  # a damaged run.json must not fail a finished stage
            info = {}
        info = info if isinstance(info, dict) else {}
        info.setdefault("stages", {})[name] = dict(timing)
        atomic_write_json(path, info)
