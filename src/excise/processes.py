"""The processes of one run: one, or several under ``accelerate launch`` (torchrun).

Every launched process runs the same code; only the main one writes a run directory or a cache
entry, and the others wait for it at a barrier (``wait_for_everyone``).
"""

from __future__ import annotations

import os


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


__all__ = ["is_main_process", "wait_for_everyone", "world_size"]
