"""Shared helpers for the benchmark scripts: model + prompts, interleaved timing, tables.

Timing is interleaved (each round runs every method once, in a rotating order) so that load
from other processes on a shared machine hits all methods alike instead of whichever ran last.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model is local; never wait on the hub

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load average (a shared machine)."""
    import torch
    import transformers

    from excise.train import fast_bf16

    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cpu": cpu,
        # the widest vector ISA: float sums (so trained weights) differ between an AVX2 and an AVX-512 CPU
        "isa": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": fast_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def bbq_prompts(handle: Any, n: int, seed: int = 0) -> list[str]:
    """n chat-formatted BBQ prompts, spread over categories (deterministic for a seed)."""
    import random

    from excise.tasks.bbq import CATEGORIES, format_prompt, load_bbq

    items = load_bbq(limit_per_category=50)
    by_cat: dict[str, list] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    rng = random.Random(seed)
    picked = []
    cats = [c for c in CATEGORIES if by_cat.get(c)]
    while len(picked) < n:
        c = cats[len(picked) % len(cats)]
        picked.append(rng.choice(by_cat[c]))
    return [handle.chat(format_prompt(it)) for it in picked]


def time_interleaved(methods: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run every method ``warmup`` times, then ``repeats`` timed rounds in rotating order (wall ms).

    ``cpu``, if given, receives each run's process CPU time (ms): with one torch thread it
    measures the work done, which other processes' load disturbs far less than wall time."""
    import gc

    names = list(methods)
    for _ in range(warmup):
        for name in names:
            out = methods[name]()
            del out
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            out = methods[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.process_time() - c0) * 1e3)
            del out
    return times


def median_ci(xs: list[float]):
    """Median with a seeded percentile-bootstrap 95% CI (excise.measure.stats)."""
    import numpy as np

    from excise.measure.stats import bootstrap

    return bootstrap(np.asarray(xs, dtype=float), lambda a: float(np.median(a.astype(float))), seed=0)


def ratio_ci(xs: list[float], base: list[float]):
    """Ratio of medians (method / baseline), bootstrapping paired rounds."""
    import numpy as np

    from excise.measure.stats import bootstrap

    pairs = np.asarray(list(zip(xs, base)), dtype=float)
    return bootstrap(pairs, lambda a: float(np.median(a[:, 0].astype(float)) / np.median(a[:, 1].astype(float))), seed=0)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells[1:]])


def save(name: str, obj: dict) -> Path:
    from excise.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(RESULTS / f"{name}.json", obj)


def quick_arith_pretrain() -> Any:
    """The tiny arithmetic base every UNDO benchmark's ``--quick`` run pretrains (one config, so one cache entry)."""
    from excise.organisms.arithmetic import PretrainConfig

    return PretrainConfig(steps=150, target_accuracy=None, log_every=0, eval_n_per_op=20)


def run_main(main: Callable[[], int]) -> None:
    """A benchmark's entry point: bad input (an ExciseError) is one line on stderr and exit code 2."""
    from excise.errors import ExciseError

    try:
        raise SystemExit(main())
    except ExciseError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
