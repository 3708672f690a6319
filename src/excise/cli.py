"""The `excise` command line: a thin typer layer over the Python API.

Heavy imports (torch, transformers) happen inside commands, so ``excise --help`` stays fast.
Bad input raises ExciseError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import errno
import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from excise.errors import ExciseError
from excise.processes import tune_allocator

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
def models(as_json: bool = typer.Option(False, "--json", help="a JSON list of {name, kind, hub_id, status}, for scripts")) -> None:
    """List the embedded default models and whether each is ready offline."""
    import json

    from excise.models.defaults import DEFAULTS, status

    rows = [{"name": name, "kind": d.kind, "hub_id": d.hub_id, "status": status(name)} for name, d in DEFAULTS.items()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not sys.stdout.isatty():  # a pipe or a file: plain tab-separated text, never truncated to a width
        print("\t".join(rows[0]))
        for r in rows:
            print("\t".join(r.values()))
        return
    from rich.table import Table

    t = Table(title="embedded defaults")
    for col in ("name", "kind", "hub id", "status"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*r.values())
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
    dry_run: bool = typer.Option(False, "--dry-run", help="every stage on a tiny random model of the recipe's "
                                 "model family, on CPU, quick variant (seconds; proves the recipe runs)"),
) -> None:
    """Run a YAML recipe: `workflow:` picks the workflow, the other keys are its typed config."""
    from excise.recipes.loader import run_recipe_file

    transform = None
    if dry_run:
        from excise.recipes.dry_run import dry_run_settings as transform
    run_recipe_file(recipe, out=out, force=force, quick=quick or dry_run, console=_console(), overrides=set_,
                    transform=transform)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="recipe YAML (a path, or the name of a packaged recipe)"),
    gpu: Optional[str] = typer.Option(None, help="h100, h200, a100, a10g, l4 or rtx4090 (default: the recipe's plan)"),
    n_gpus: Optional[int] = typer.Option(None, "--n-gpus", min=1, help="GPUs (default: the recipe's plan)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="shard weights, gradients, optimizer state"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=1, help="GiB per GPU (default: the GPU's, "
                                                                               "or the real one when CUDA is present)"),
    set_: list[str] = typer.Option([], "--set", help="dotted override of a recipe setting (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the estimate as JSON"),
) -> None:
    """Estimate a recipe's GPU memory and time from the model's config alone (no weights); exit 2 if it does not fit."""
    import json

    from excise.recipes.plan import format_plan, plan_file

    p = plan_file(recipe, set_, gpu=gpu, n_gpus=n_gpus, fsdp=fsdp, gradient_checkpointing=gradient_checkpointing,
                  gpu_memory_gib=gpu_memory)
    print(json.dumps(p, indent=2) if as_json else format_plan(p))
    if p.get("accelerate") and not as_json:
        print(f"launch: accelerate launch --config_file <excise>/recipes/{p['accelerate']} -m excise.cli run {recipe}")
    if not p["fits"]:
        worst = max(p["stages"], key=lambda r: r["total_gib"])
        raise ExciseError(f"{recipe}: stage '{worst['stage']}' needs {worst['total_gib']} GiB per GPU, the GPU has "
                          f"{p['gpu_memory_gib']:.0f} GiB (options: gradient checkpointing, FSDP over more GPUs, "
                          "a smaller batch, a 16-bit dtype)")


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
    """Run the CLI. Exit codes: 0 done, 2 bad input (one line on stderr), 1 internal error (a traceback), 130
    interrupted. ``--debug`` anywhere (or EXCISE_DEBUG=1) shows the full traceback of any error."""
    import os
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EXCISE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not debug:  # library notices that are not the user's business
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            for module in ("transformers", "torch", "peft", "accelerate", "huggingface_hub", "datasets", "click",
                           "sklearn", "fairlearn", "pydantic"):
                warnings.filterwarnings("ignore", category=category, module=rf"{module}(\.|$)")
        warnings.filterwarnings("ignore", message=r".*requires? torchvision.*")
    tune_allocator()  # activations kept for analysis are reused, not page-faulted afresh each pass
    if not sys.stderr.isatty():  # a log file or a pipe: no library progress bars (excise's own stay)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def fail(message: str, code: int) -> None:
        print(" ".join(f"error: {message}".split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(code)

    try:
        rv = app(args=args, prog_name="excise", standalone_mode=False)
    except ExciseError as e:
        if debug:
            raise
        fail(str(e), 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `excise models | head -1`: the reader left; nothing more to say
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:  # the environment, not excise: disk full, permission denied, read-only file system
        if debug or e.errno not in _ENV_ERRNOS:
            raise
        fail(f"{e.strerror}: {e.filename}" if e.filename else str(e), 2)
    except Exception as e:
        # click's exceptions, matched by name: typer ships its own copy of click
        kinds = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:  # `excise bbq`: the group's help, as before
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if "Abort" in kinds:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        if "UsageError" in kinds:  # unknown option, value of the wrong type: one line, and where to look
            ctx = getattr(e, "ctx", None)
            fail(f"{e.format_message()} (see '{ctx.command_path if ctx else 'excise'} --help')", 2)  # type: ignore[attr-defined]
        if "ClickException" in kinds:
            fail(e.format_message(), 2)  # type: ignore[attr-defined]
        if type(e).__name__ == "ValidationError" and hasattr(e, "errors"):  # a config built without config.validate
            err = e.errors()[0]  # type: ignore[attr-defined]
            fail(f"{'.'.join(str(p) for p in err.get('loc', ())) or 'settings'}: {err.get('msg', 'invalid value')}", 2)
        if type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU
            fail(f"out of memory ({_first(e)}); try a smaller --batch-size or another --device", 2)
        raise
    if rv == 130:  # typer turns an interrupt into this exit code
        print("interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


_ENV_ERRNOS = tuple(getattr(errno, n) for n in ("ENOSPC", "EACCES", "EPERM", "EROFS", "EDQUOT", "EMFILE") if hasattr(errno, n))


if __name__ == "__main__":  # pragma: no cover
    main()
