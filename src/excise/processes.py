"""The processes of one run: one, or several under ``accelerate launch`` (torchrun).

Every launched process runs the same code; only the main one writes a run directory or a cache
entry, and the others wait for it at a barrier (``wait_for_everyone``).
"""

from __future__ import annotations

import ctypes
import os
import sys


def world_size() -> int:
    """Processes of this run: ``accelerate launch`` (torchrun) sets WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return world_size() == 1 or int(os.environ.get("RANK", "0") or 0) == 0


def wait_for_everyone() -> None:
    """A barrier across the launched processes (nothing in a single process)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        # without cpu=True on a machine with no GPU, accelerate leaves the launched processes unjoined
        # (DistributedType.NO) and its barrier returns at once; train()'s Accelerator(cpu=True) agrees
        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc keep freed tensor memory for the next forward pass instead of handing it back to the OS.

    By default glibc serves large blocks with mmap and gives a freed heap top back above a small trim
    threshold, so a forward pass that keeps its activations alive (``Trace`` with ``pool="all"``)
    page-faults fresh memory every pass: 1.19x a plain forward on a small falcon on CPU, 1.08x with
    these settings, and the plain forward itself about 30% faster (benchmarks/README.md 1b). Up to
    ``trim_threshold`` bytes of freed
    memory stay mapped. Does nothing off Linux/glibc, when EXCISE_TUNE_MALLOC=0, or when the user set
    their own ``MALLOC_*`` variables; returns whether the settings were applied. The CLI calls it.
    """
    if (not sys.platform.startswith("linux") or os.environ.get("EXCISE_TUNE_MALLOC", "1") == "0"
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


__all__ = ["is_main_process", "tune_allocator", "wait_for_everyone", "world_size"]
