"""`excise fair ...`: fair encoders on the command line (a thin layer over excise.recipes.fair_encoder).

Every setting of the workflow is reachable with ``--set`` (``--set fair.lambda_eo=2``); nothing is
re-declared here. Nothing heavy is imported at module level, so `excise --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from excise.commands import FORCE, QUICK, SET, config_option, console, recipe_config

app = typer.Typer(help="Fair encoders: fairness-aware LoRA with reports and a PEFT adapter.", no_args_is_help=True)
OUT = typer.Option(Path("runs/fair_encoder"), help="run directory")
CONFIG = config_option("fair_encoder.yaml")


def _run(config: Optional[Path], out: Path, force: bool, quick: bool, overrides: list[str], stop_after: str | None):
    from excise.recipes.fair_config import FairEncoderConfig, quick_variant
    from excise.recipes.fair_encoder import run_fair

    cfg = recipe_config(config, "fair_encoder.yaml", FairEncoderConfig, overrides)
    return run_fair(quick_variant(cfg) if quick else cfg, out, force=force, console=console(), stop_after=stop_after)


@app.command()
def train(config: Optional[Path] = CONFIG, out: Path = OUT, force: bool = FORCE, quick: bool = QUICK,
          set_: list[str] = SET) -> None:
    """Split the data, score the frozen baselines, train plain and fair LoRA (checkpoints, histories)."""
    res = _run(config, out, force, quick, set_, "fair")
    console().print(f"trained: {res['dir']}; adapter: {res['fair']['export']}")


@app.command()
def compare(config: Optional[Path] = CONFIG, out: Path = OUT, force: bool = FORCE, quick: bool = QUICK,
            set_: list[str] = SET) -> None:
    """Everything `train` does, then the side-by-side report (resumes a finished `train`)."""
    res = _run(config, out, force, quick, set_, None)
    console().print(f"report: {Path(res['dir']) / 'report' / 'report.md'}")


app.command("run")(compare)


@app.command("eval")
def eval_(adapter: Path = typer.Argument(..., help="an exported fair-encoder directory (excise fair export)"),
          binary: bool = typer.Option(True, help="BUG binary framing (must match how the adapter was trained)"),
          seed: int = typer.Option(0, help="seed of the BUG split and the bootstrap"),
          out: Optional[Path] = typer.Option(None, help="where to write test.json / test.csv (default: <adapter>/eval)"),
          n_boot: int = typer.Option(1000, min=10, help="bootstrap resamples")) -> None:
    """Score an exported adapter on the BUG test split: utility and fairness with 95% CIs."""
    from excise.errors import ExciseError
    from excise.intervene.fair_export import load_exported
    from excise.intervene.fair_finetune import predict
    from excise.measure.fairness import fairness_report
    from excise.tasks.fairness import load_bug

    if not (adapter / "fair_encoder.json").exists():
        raise ExciseError("not an exported fair encoder (no fair_encoder.json)", where=str(adapter))
    fe = load_exported(adapter)
    data = load_bug(seed=seed, binary=binary)
    if len(fe.classes) != len(data.label_names):
        raise ExciseError(f"the adapter predicts {len(fe.classes)} classes, the task has {len(data.label_names)}; "
                          "check --binary")
    logits, _ = predict(fe, data.test)
    pred = logits.argmax(1)
    import numpy as np

    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob = prob / prob.sum(1, keepdims=True)
    attr = fe.attribute
    rep = fairness_report([e.label for e in data.test], pred, prob[:, 1] if prob.shape[1] == 2 else prob,
                          [str(e.groups[attr]) for e in data.test], label_names=list(data.label_names),
                          n_boot=n_boot, seed=seed, group_by=attr)
    rep.save(out or adapter / "eval", "test")
    console().print(rep.text(f"{adapter}: BUG test split (argmax, no threshold)"), markup=False, highlight=False)


@app.command()
def export(run: Path = typer.Option(..., "--run", help="a finished run directory (its fair stage)"),
           to: Path = typer.Option(..., "--to", help="where to write the adapter, heads and model card")) -> None:
    """Copy the fair model of a run as a PEFT adapter anyone can load with PeftModel.from_pretrained."""
    import shutil

    from excise.errors import ExciseError
    from excise.io import atomic_dir

    src = run / "fair" / "export"
    if not (src / "fair_encoder.json").exists():
        raise ExciseError("no exported fair model in this run (run `excise fair train` first)", where=str(src))
    if to.exists():
        raise ExciseError("destination exists; choose another --to", where=str(to))
    with atomic_dir(to) as tmp:
        for p in src.iterdir():
            shutil.copy2(p, tmp / p.name)
    console().print(f"adapter: {to}  (PeftModel.from_pretrained(AutoModel.from_pretrained(base), '{to}'))")
