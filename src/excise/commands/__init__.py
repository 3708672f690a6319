"""Command groups of the CLI (one module per workflow); options and helpers shared by every group live here.

Nothing heavy is imported at module level, so `excise --help` stays free of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

SET = typer.Option([], "--set", help="dotted override of any setting, e.g. --set finetune.lora.r=16 "
                   "(repeatable; values are YAML; the typed config validates the result)")
FORCE = typer.Option(False, "--force", help="overwrite a run directory holding another config")
QUICK = typer.Option(False, "--quick", help="small smoke run")


def config_option(recipe: str) -> Any:
    return typer.Option(None, help=f"a {Path(recipe).stem} recipe YAML (default: the packaged one)")


def console() -> Any:
    from rich.console import Console

    return Console()


def recipe_config(config: Optional[Path], default_recipe: str, config_cls: type, overrides: list[str]) -> Any:
    """The workflow's typed config from a recipe YAML (the packaged one by default) plus ``--set`` overrides."""
    from excise.config import apply_overrides, load_yaml, validate
    from excise.recipes.loader import find_recipe

    path = find_recipe(config or default_recipe)
    data = load_yaml(path) or {}
    data.pop("workflow", None)
    data.pop("out", None)
    data.pop("plan", None)
    return validate(config_cls, apply_overrides(data, overrides), str(path))
