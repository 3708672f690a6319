"""`excise captions ...`: caption gender bias in VLMs (a thin layer over excise.recipes.caption_bias).

Each command runs the workflow up to its stage (earlier stages resume from the run directory):
extract -> sae -> locate -> eval (the model before mitigation) -> mitigate (gender-swap LoRA and
the SAE latent edit, both evaluated) -> run (+ report). Every setting is reachable with ``--set``
(``--set mitigate.train.steps=800``). Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from excise.commands import FORCE, QUICK, SET, config_option, console, recipe_config

app = typer.Typer(help="Caption gender bias in vision-language models: activations, SAEs, gender-swap LoRA.",
                  no_args_is_help=True)
OUT = typer.Option(Path("runs/caption_bias"), help="run directory")
CONFIG = config_option("caption_bias.yaml")


def _run(config: Optional[Path], out: Path, force: bool, quick: bool, overrides: list[str], stop_after: str | None):
    from excise.recipes.caption_bias import run_captions
    from excise.recipes.caption_config import CaptionBiasConfig, quick_variant

    cfg = recipe_config(config, "caption_bias.yaml", CaptionBiasConfig, overrides)
    return run_captions(quick_variant(cfg) if quick else cfg, out, force=force, console=console(), stop_after=stop_after)


def _stage(stop: str | None, doc: str):
    def cmd(config: Optional[Path] = CONFIG, out: Path = OUT, force: bool = FORCE, quick: bool = QUICK,
            set_: list[str] = SET) -> None:
        res = _run(config, out, force, quick, set_, stop)
        console().print(f"{stop or 'run'} done: {Path(res['dir']) / (stop or 'report')}")

    cmd.__doc__ = doc
    return cmd


app.command("extract")(_stage("extract", "Trace the locate scenes: vision blocks, projector, LM residuals -> shards."))
app.command("sae")(_stage("sae", "Train the sparse autoencoder; L0, explained variance, dead share, loss recovered."))
app.command("locate")(_stage("locate", "Gender latents (AUROC with CIs) and activation patching scene <- twin."))
app.command("eval")(_stage("before", "Caption the held-out scenes with the model: gender metrics, BLEU, ROUGE-L."))
app.command("mitigate")(_stage("sae_edit", "Gender-swap LoRA and the SAE latent edit, each evaluated."))
app.command("run")(_stage(None, "Every stage, then the report (resumes finished stages)."))
