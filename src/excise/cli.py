"""The `excise` command line: a thin typer layer over the Python API.

Heavy imports (torch, transformers) happen inside commands, so ``excise --help`` stays fast.
Bad input raises ExciseError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from excise.errors import ExciseError

app = typer.Typer(
    name="excise",
    help="Find where a transformer keeps an unwanted behaviour, remove it, and prove what changed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Workflow command groups live in excise/commands/<name>.py, each exposing a typer `app`
# and importing nothing heavy at module level.
WORKFLOW_GROUPS = ("bbq", "concept", "undo", "fair", "captions")
for _name in WORKFLOW_GROUPS:
    try:
        _mod = importlib.import_module(f"excise.commands.{_name}")
    except ModuleNotFoundError as _e:  # group not built yet
        if _e.name != f"excise.commands.{_name}":
            raise
        continue
    app.add_typer(_mod.app, name=_name)


def _console():
    from rich.console import Console

    return Console(stderr=False)


@app.command()
def models() -> None:
    """List the embedded default models and whether each is ready offline."""
    from rich.table import Table

    from excise.models.defaults import DEFAULTS, status

    t = Table(title="embedded defaults")
    t.add_column("name")
    t.add_column("kind")
    t.add_column("hub id")
    t.add_column("status")
    for name, d in DEFAULTS.items():
        t.add_row(name, d.kind, d.hub_id, status(name))
    _console().print(t)


@app.command()
def inspect(
    model: str = typer.Option("smollm2-135m-instruct", help="embedded default, local directory or hub id"),
    out: Path = typer.Option(Path("runs/inspect"), help="run directory"),
    n_prompts: int = typer.Option(4, help="BBQ prompts to trace"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config"),
) -> None:
    """Print the anatomy, trace BBQ prompts, save attention / MLP / hidden-state heatmaps and a summary."""
    from excise.recipes.inspect import InspectConfig, run_inspect

    cfg = _validated(InspectConfig, dict(model=model, n_prompts=n_prompts, device=device, dtype=dtype))
    res = run_inspect(cfg, out, force=force, console=_console())
    state = "already done (resumed)" if res["skipped"] else "done"
    _console().print(f"inspect {state}: {res['dir']}")


@app.command()
def demo(which: str = typer.Argument("bbq", help="bbq: the main job (what `make demo` runs); fair: the fair-encoder "
                                                 "workflow on minilm-l6; captions: caption gender bias on the "
                                                 "caption organism"),
         out: Optional[Path] = typer.Option(None, help="run directory (default: runs/demo, or runs/demo_<which>)"),
         force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config")) -> None:
    """A workflow on the embedded defaults, in about ten minutes on a laptop-class CPU."""
    if which == "bbq":
        from excise.recipes import demo as demo_mod

        demo_mod.run_demo(out or Path("runs/demo"), force=force, console=_console())
    elif which in ("fair", "captions"):
        from excise.recipes.loader import run_recipe_file

        recipe = {"fair": "fair_encoder.yaml", "captions": "caption_bias.yaml"}[which]
        run_recipe_file(recipe, out=out or Path(f"runs/demo_{which}"), force=force, console=_console())
    else:
        raise ExciseError(f"unknown demo '{which}'; choose bbq, fair or captions")


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="recipe YAML (a path, or the name of a packaged recipe)"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: the recipe's `out`)"),
    force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config"),
    quick: bool = typer.Option(False, "--quick", help="the recipe's quick variant, where it has one"),
    set_: list[str] = typer.Option([], "--set", help="dotted override, e.g. --set finetune.lora.r=16 "
                                   "or --set stages.2.select.k=5 (repeatable; values are YAML)"),
) -> None:
    """Run a YAML recipe: `workflow:` picks the workflow, the other keys are its typed config."""
    from excise.recipes.loader import run_recipe_file

    run_recipe_file(recipe, out=out, force=force, quick=quick, console=_console(), overrides=set_)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="a run directory, or two runs of the same workflow to compare"),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: RUN/report.html, or RUN_A/compare_<RUN_B>.html)"),
) -> None:
    """One self-contained HTML report of a run (verdict, tables, figures, provenance), or two runs side by side."""
    from excise.report.html import write_report

    path = write_report(runs, out)
    _console().print(f"report: {path}", markup=False, highlight=False)


def _validated(model_cls, data: dict, source: str = "command line"):
    from excise.config import validate

    return validate(model_cls, data, source)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except ExciseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
