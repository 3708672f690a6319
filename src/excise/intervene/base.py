"""The intervention contract: ``Intervention(config).apply(handle, mask, data) -> new handle``.

An intervention reads a :class:`~excise.select.Mask` over heads or neurons (or parameter masks,
or nothing, for the unlocalised baseline) and the build examples of a task, and returns a new
handle (``handle.with_model(...)``) around a changed copy of the model: the caller's handle is
never mutated, so the model before and after can be measured side by side. ``accepts`` names
the mask kinds it can act on; ``None`` in it means it also runs without a mask.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from excise.errors import ExciseError
from excise.locate.base import LocateData
from excise.registry import Registry


class Intervention(Protocol):
    """A change to the model driven by a mask; ``Config`` documents its settings."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    accepts: ClassVar[tuple[str | None, ...]]

    def __init__(self, config: Any) -> None: ...

    def apply(self, handle: Any, mask: Any, data: LocateData) -> Any: ...


INTERVENTIONS: Registry[Intervention] = Registry("intervention")


def check_mask(intervention: Any, mask: Any) -> None:
    """One line when an intervention is handed a mask kind it cannot act on."""
    kind = getattr(mask, "kind", None) if mask is not None else None
    if kind not in intervention.accepts:
        got = f"a '{kind}' mask" if kind else "no mask"
        want = ", ".join(k or "no mask" for k in intervention.accepts)
        raise ExciseError(f"intervention '{intervention.name}' got {got}; it takes: {want}")


def result_handle(handle: Any, model: Any, **extra: Any) -> Any:
    """What every intervention returns: a new handle around ``model`` in eval mode with frozen weights."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return handle.with_model(model, **extra)
