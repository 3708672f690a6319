"""Localizers: one module per method, each registered in ``LOCALIZERS`` and returning ``Scores``."""

from excise.locate import fisher, heads, paramdiff, saliency, snmf  # noqa: F401  (registration)
from excise.locate.base import LOCALIZERS, Example, LocateData, Localizer

__all__ = ["LOCALIZERS", "Example", "LocateData", "Localizer"]
