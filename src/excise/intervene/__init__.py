"""Interventions: one module per method, each registered in ``INTERVENTIONS``; (handle, mask) -> new handle."""

from excise.intervene import heads, lora_unlearn, undo, unlearn_methods  # noqa: F401  (registration)
from excise.intervene.base import INTERVENTIONS, Intervention, check_mask

__all__ = ["INTERVENTIONS", "Intervention", "check_mask"]
