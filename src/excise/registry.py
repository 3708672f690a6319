"""Name -> class registries, so a YAML stage list can name any localizer, intervention or task.

A registered class carries ``name`` (what YAML says), ``Config`` (a pydantic model whose defaults
are documented field by field) and a one-line docstring. ``build(name, settings)`` validates the
settings against ``Config`` (unknown keys are refused) and returns an instance.
"""

from __future__ import annotations

from typing import Any, Generic, Mapping, TypeVar

from excise.config import setting_error, validate
from excise.errors import ExciseError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one kind (localizer, intervention, task) by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not name or not hasattr(cls, "Config"):
            raise TypeError(f"a registered {self.kind} needs `name` and `Config` class attributes")
        if name in self._classes and self._classes[name] is not cls:
            raise TypeError(f"{self.kind} '{name}' is registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ExciseError(f"unknown {self.kind} '{name}'; choose one of {', '.join(self.names())}")
        return self._classes[name]

    def build(self, name: str, settings: Mapping[str, Any] | None = None, source: str = "config") -> T:
        if name not in self._classes:  # name the recipe line of the unknown name
            raise setting_error(source, ("method" if self.kind != "task" else "name",),
                                f"unknown {self.kind} '{name}'; choose one of {', '.join(self.names())}")
        cls = self.get(name)
        cfg = validate(cls.Config, dict(settings or {}), source)  # type: ignore[attr-defined]
        return cls(cfg)  # type: ignore[call-arg]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self):
        return iter(self.names())


class Configured:
    """Base of registered classes: holds the validated ``Config`` instance the registry built."""

    def __init__(self, config: Any):
        self.config = config
