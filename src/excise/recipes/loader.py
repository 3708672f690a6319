"""`excise run RECIPE.yaml`: find the recipe, validate it, dispatch to its workflow.

A recipe is YAML with ``workflow: <name>`` and ``out:`` plus the workflow's typed settings.
Workflows register here by name; each lives in ``excise/recipes/<name>.py`` and exposes
``run_recipe(settings: dict, out, *, force, quick, source, console) -> dict``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from excise.config import apply_overrides, load_yaml
from excise.errors import ExciseError

WORKFLOWS = {
    "inspect": "excise.recipes.inspect",
    "bbq": "excise.recipes.bbq_debias",
    "bbq-study": "excise.recipes.bbq_study",
    "concept": "excise.recipes.concept_unlearn",
    "undo": "excise.recipes.robust_unlearn",
    "pipeline": "excise.recipes.pipeline",
    "fair": "excise.recipes.fair_encoder",
    "captions": "excise.recipes.caption_bias",
}
PACKAGED = Path(__file__).parent


def find_recipe(recipe: str | Path) -> Path:
    """A path as given, else a packaged recipe by file name (``recipes/bbq_debias.yaml`` works anywhere)."""
    p = Path(recipe)
    if p.exists():
        return p
    for cand in (PACKAGED / p.name, PACKAGED / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    raise ExciseError(f"recipe not found: {recipe} (packaged: {', '.join(sorted(x.name for x in PACKAGED.glob('*.yaml')))})")


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, str, str, dict]:
    """(the recipe's path, its workflow, its default out folder, the workflow's settings) of a recipe file;
    the settings are not validated yet (each workflow validates its own)."""
    path = find_recipe(recipe)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ExciseError("a recipe is a mapping with a 'workflow' key", where=str(path))
    data = apply_overrides(data, list(overrides))
    workflow = data.pop("workflow", None)
    if workflow not in WORKFLOWS:
        raise ExciseError(f"unknown workflow {workflow!r}; choose one of {', '.join(WORKFLOWS)}", where=f"{path}:workflow")
    default_out = data.pop("out", f"runs/{path.stem}")
    data.pop("plan", None)  # the hardware a recipe expects: read by `excise plan`, not by the workflow
    return path, workflow, default_out, data


def run_recipe_file(recipe: str | Path, *, out: Path | None = None, force: bool = False, quick: bool = False,
                    console: Any = None, overrides: list[str] | tuple[str, ...] = (),
                    transform: Callable[[str, dict], dict] | None = None) -> dict:
    """Run a recipe file; ``transform(workflow, settings)`` may rewrite the settings first (``--dry-run``)."""
    path, workflow, default_out, data = load_recipe(recipe, overrides)
    if transform is not None:
        data = transform(workflow, data)
    out = Path(out or default_out)
    try:
        mod = importlib.import_module(WORKFLOWS[workflow])
    except ModuleNotFoundError as e:
        if e.name == WORKFLOWS[workflow]:
            raise ExciseError(f"workflow '{workflow}' is not available in this version of excise", where=str(path)) from None
        raise
    return mod.run_recipe(data, out, force=force, quick=quick, source=str(path), console=console)
