"""The localizer contract: ``Localizer(config).score(handle, data) -> Scores``.

Every localizer reads the same :class:`LocateData` (the examples that carry the behaviour, the
examples to keep, and, for the few methods that need them, task items or a reference model) and
returns :class:`~excise.units.Scores` over one unit kind. ``excise.select.select`` turns the
scores into a mask and any registered intervention acts on it, so "Fisher scores drive head
soft-pruning" is a YAML stage list, not new code. Localizers never change the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

from pydantic import BaseModel

from excise.errors import ExciseError
from excise.registry import Registry
from excise.units import Scores


@dataclass(frozen=True)
class Example:
    """A prompt, already formatted for the model, and the response whose likelihood carries the behaviour.

    Duck-types as a concept item (``format``, ``target()``) and an arithmetic item (``text``),
    so every localizer and training objective reads it.
    """

    prompt: str
    response: str
    format: str = "completion"

    @property
    def text(self) -> str:
        return self.prompt + self.response

    def target(self) -> str:
        return self.response


@dataclass
class LocateData:
    """What localizers and interventions may read. Only *build* items go here, never evaluation items."""

    forget: Sequence[Example] = ()
    retain: Sequence[Example] = ()
    items: Sequence[Any] = ()  # task items for task-specific localizers (BBQ pairs for head attribution)
    reference: Any = None  # another handle of the same architecture (parameter difference)
    meta: dict[str, Any] = field(default_factory=dict)

    def require(self, what: Sequence[str], who: str) -> None:
        for w in what:
            v = getattr(self, w)
            if v is None or (not isinstance(v, (str, bytes)) and hasattr(v, "__len__") and len(v) == 0):
                raise ExciseError(f"localizer '{who}' needs {w} data, which this task does not provide")


class Localizer(Protocol):
    """A scoring rule over units; ``Config`` documents its settings."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    needs: ClassVar[tuple[str, ...]]

    def __init__(self, config: Any) -> None: ...

    def score(self, handle: Any, data: LocateData) -> Scores: ...


LOCALIZERS: Registry[Localizer] = Registry("localizer")
