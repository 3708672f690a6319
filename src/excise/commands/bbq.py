"""`excise bbq ...`: the BBQ bias workflow on the command line (a thin layer over excise.recipes.bbq_eval
and excise.recipes.bbq_debias).

Nothing heavy is imported at module level, so `excise --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from excise.commands import SET

app = typer.Typer(help="BBQ bias workflow: evaluate, score predictions from any source.", no_args_is_help=True)


def _console():
    from rich.console import Console

    return Console()


def _split_categories(categories: str | None) -> list[str] | None:
    """``--categories``: None or 'all' -> None (every category); anything else must name at least one."""
    if categories is None or categories.strip().lower() == "all":
        return None
    cats = [c.strip() for c in categories.split(",") if c.strip()]
    if not cats:
        from excise.errors import ExciseError

        raise ExciseError(f"--categories {categories!r} names no category; give e.g. Age,SES or 'all'")
    return cats


@app.command("eval")
def eval_(
    model: str = typer.Option("smollm2-135m-instruct", help="embedded default, local directory or hub id"),
    categories: str = typer.Option("all", help="comma-separated BBQ categories, or 'all'"),
    per_category: int = typer.Option(50, help="items per category, stratified over context x polarity; 0 = all"),
    scoring: str = typer.Option("loglik", help="loglik, letter or generate"),
    out: Path = typer.Option(Path("runs/bbq-eval"), help="run directory"),
    seed: int = typer.Option(0, help="seed for sampling and bootstrap"),
    batch_size: int = typer.Option(8, help="items per forward pass"),
    normalize: str = typer.Option("none", help="loglik length normalisation: none, tokens or chars"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for CIs"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of <Category>.jsonl (default: packaged BBQ)"),
    hf_dataset: Optional[str] = typer.Option(None, help="Hugging Face dataset id or local path (official BBQ fields)"),
    hf_split: Optional[str] = typer.Option(None, help="split of --hf-dataset (default: all)"),
    hf_metadata: Optional[Path] = typer.Option(None, help="additional_metadata.csv to join to --hf-dataset rows"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config"),
) -> None:
    """Score a model on BBQ: accuracy and bias scores (s_AMB, s_DIS) per category with 95% CIs."""
    from excise.config import validate
    from excise.recipes.bbq_eval import BBQEvalConfig, run_eval

    data = dict(model=model, per_category=per_category or None, scoring=scoring, seed=seed, batch_size=batch_size,
                normalize=normalize, n_boot=n_boot, data_dir=str(data_dir) if data_dir else None,
                hf_dataset=hf_dataset, hf_split=hf_split, hf_metadata=str(hf_metadata) if hf_metadata else None,
                device=device, dtype=dtype)
    cats = _split_categories(categories)
    if cats is not None:
        data["categories"] = cats
    cfg = validate(BBQEvalConfig, data, "command line")
    con = _console()
    res = run_eval(cfg, out, force=force, console=con)
    con.print(f"bbq eval {'already done (resumed)' if res['skipped'] else 'done'}: {res['dir']}")


@app.command("score")
def score(
    predictions: Path = typer.Argument(..., help="JSONL rows with the BBQ fields plus 'pred' (0-2) or a text answer"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: <predictions>_scores next to the file)"),
    n_boot: int = typer.Option(1000, min=10, help="bootstrap resamples for CIs"),
    seed: int = typer.Option(0, min=0, max=2**31 - 1, help="bootstrap seed"),
    strict: bool = typer.Option(
        False, "--strict",
        help="match text answers by the BBQ authors' rules only: exact (the answer equals an option) and "
             "two-words (it contains the first two words of an option's answer_info text). Turns off the lenient "
             "rules: a leading letter A/B/C, an option's answer_info or text contained in the answer, and "
             "'unknown' phrases (e.g. 'cannot be determined') for the unknown option"),
    data_dir: Optional[Path] = typer.Option(
        None, help="BBQ data the predictions were made on: rows are checked against its <Category>.jsonl "
                   "(id, question_index, answers) and targets come from its additional_metadata.csv "
                   "(default: the packaged BBQ)"),
) -> None:
    """Bias scores for predictions from any source (an API model, another harness)."""
    from excise.recipes.bbq_eval import run_score

    con = _console()
    res = run_score(predictions, out, n_boot=n_boot, seed=seed, lenient=not strict, data_dir=data_dir, console=con)
    con.print(f"bbq score done: {res['dir']} ({res['n_unmatched']} unmatched rows counted and left out)")


# ---------------------------------------------------------------- localize | mitigate | run (the debias workflow)

def _debias_config(model: str, categories: Optional[str], per_category: int, scoring: str, seed: int,
                   overrides: list[str] = (), **extra):
    from excise.config import apply_overrides, validate
    from excise.recipes.bbq_debias import BBQDebiasConfig

    from excise.recipes.bbq_debias import _default_finetune

    cats = _split_categories(categories)
    if "finetune" in extra:  # command-line fine-tune options override the workflow's defaults
        extra["finetune"] = {**_default_finetune().model_dump(), **extra["finetune"]}
    data = dict(model=model, categories=cats, per_category=per_category, scoring=scoring, seed=seed, **extra)
    return validate(BBQDebiasConfig, apply_overrides(data, overrides), "command line")


def _run_debias(stages, model, categories, per_category, scoring, out, seed, force, extra, overrides=()) -> None:
    from rich.console import Console

    from excise.recipes.bbq_debias import run_bbq
    from excise.recipes.bbq_report import summary_text

    console = Console()
    cfg = _debias_config(model, categories, per_category, scoring, seed, list(overrides), **extra)
    s = run_bbq(cfg, out, force=force, console=console, stages=stages)
    if "report" in stages and s.get("model"):  # the summary exists once the report stage ran
        console.print(summary_text(s), markup=False, highlight=False, soft_wrap=True)
    console.print(f"run directory: {out}")


def _debias_command(stages: tuple[str, ...], doc: str):
    """One command per prefix of the workflow's stages; they share options so the same --out resumes."""

    def command(
        model: str = typer.Option("smollm2-135m-instruct", help="embedded default, local directory, hub id, 'biased' "
                                   "(the biased organism, built and cached on first use) or 'planted'"),
        categories: Optional[str] = typer.Option(None, help="comma-separated BBQ categories (default: all 11; "
                                                                           "for 'biased', its four)"),
        per_category: int = typer.Option(24, help="held-out evaluation items per category"),
        scoring: str = typer.Option("loglik", help="evaluation scoring: loglik, letter or generate"),
        pairs_per_category: int = typer.Option(8, help="ambiguous/disambiguated pairs per category for attribution"),
        split_by: Optional[str] = typer.Option(
            None, help="held-out unit: template or names (default: template; for 'planted', the split it is built for)"),
        k: int = typer.Option(3, help="heads to soft-prune (top-k)"),
        head_scale: float = typer.Option(0.2, help="soft-pruning scale (0 removes the heads)"),
        method: str = typer.Option("lora", help="fine-tune after pruning: lora or full"),
        steps: int = typer.Option(12, help="fine-tune steps"),
        out: Path = typer.Option(Path("runs/bbq_debias"), help="run directory"),
        seed: int = typer.Option(0, help="seed"),
        force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config"),
        set_: list[str] = SET,
    ) -> None:
        _run_debias(stages, model, categories, per_category, scoring, out, seed, force,
                    {"pairs_per_category": pairs_per_category, "split_by": split_by,
                     "select": {"method": "topk", "k": k},
                     "head_scale": head_scale, "finetune": {"method": method, "steps": steps}}, set_)

    command.__doc__ = doc
    return command


app.command("localize")(_debias_command(
    ("eval_before", "localize"),
    "Evaluate, then rank attention heads by their part in the bias (heads.csv, layer x head heatmaps).\n\n"
    "`excise bbq mitigate` and `excise bbq run` with the same options and --out resume from here."))
app.command("mitigate")(_debias_command(
    ("eval_before", "localize", "mitigate"),
    "Evaluate, localize, soft-prune the selected heads and fine-tune; saves the mitigated model."))
app.command("run")(_debias_command(
    ("eval_before", "localize", "mitigate", "eval_after", "report"),
    "The whole workflow: evaluate, localize, soft-prune, fine-tune, re-evaluate on held-out items, report."))
