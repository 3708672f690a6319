"""`excise concept localize|unlearn|probe|run`: concept unlearning from the command line.

A thin layer over :mod:`excise.recipes.concept_unlearn` and the modules it calls; nothing heavy
is imported at module level, so ``excise --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from excise.commands import SET

app = typer.Typer(help="Concept unlearning: localize a concept, remove it with a masked LoRA, probe what leaks.",
                  no_args_is_help=True)

MODEL = typer.Option("smollm2-135m-instruct", "--model", help="embedded default, local directory or hub id")
CONCEPT = typer.Option("inception", "--concept", help="concept spec (YAML/JSON path or packaged name)")
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda")
FORCE = typer.Option(False, "--force", help="overwrite a run directory holding another config")


def _console():
    from rich.console import Console

    return Console()


def _cfg(overrides: list[str] = (), **kw):
    from excise.config import apply_overrides, validate
    from excise.recipes.concept_config import ConceptUnlearnConfig

    data = apply_overrides({k: v for k, v in kw.items() if v is not None}, list(overrides))
    return validate(ConceptUnlearnConfig, data, "command line")


@app.command()
def probe(model: str = MODEL, concept: str = CONCEPT, out: Path = typer.Option(Path("runs/concept_probe"), help="output directory"),
          adapter: Optional[Path] = typer.Option(None, help="a masked-LoRA directory to probe instead of the base model"),
          device: str = DEVICE, max_new_tokens: int = typer.Option(24, help="greedy tokens per probe"),
          screen_only: bool = typer.Option(False, "--screen-only", help="only screen the spec on the base model")) -> None:
    """Screen the spec on the base model (what it leaks / gets right) and measure leaks per family, with CIs."""
    from excise.attack.probes import screen
    from excise.errors import ExciseError
    from excise.io import atomic_dir, atomic_write_json, atomic_write_jsonl, check_out_dir
    from excise.measure.unlearning import evaluate
    from excise.models import load
    from excise.tasks.concepts import load_concept

    if max_new_tokens < 1:
        raise ExciseError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if adapter is not None:
        from excise.intervene.masked_lora import MASK_FILE

        if not (adapter / "adapter_config.json").is_file() or not (adapter / MASK_FILE).is_file():
            raise ExciseError(f"not a masked-LoRA directory (needs adapter_config.json and {MASK_FILE}; `excise concept "
                              "unlearn` writes one under <run>/unlearn/adapter)", where=str(adapter))
    check_out_dir(out)
    spec = load_concept(concept)
    h = load(model, device=device)
    filtered, report, before = screen(h, spec, max_new_tokens=max_new_tokens)
    con = _console()
    with atomic_dir(out) as tmp:
        atomic_write_jsonl(tmp / "screen_items.jsonl", report.pop("items"))
        atomic_write_json(tmp / "kept.json", report)
        atomic_write_json(tmp / "spec_kept.json", filtered.model_dump())
        for k, v in report.items():
            if isinstance(v, dict) and "kept" in v:
                con.print(f"kept {k}: {v['kept']}/{v['candidates']}")
        if not screen_only:
            gens = before
            if adapter is not None:
                from excise.intervene.masked_lora import load_masked_lora

                h.model = load_masked_lora(h.model, adapter).model
                gens = None
            ev = evaluate(h, filtered, max_new_tokens=max_new_tokens, generations=gens)
            atomic_write_json(tmp / "metrics.json", ev["metrics"])
            atomic_write_jsonl(tmp / "items.jsonl", ev["items"])
            for k, e in ev["metrics"].items():
                con.print(f"{k:32s} {e['value']!s:>8.8} [{e['lo']!s:.6}, {e['hi']!s:.6}] n={e['n']}")
    con.print(f"written: {out}")


@app.command()
def localize(model: str = MODEL, concept: str = CONCEPT, out: Path = typer.Option(Path("runs/concept_localize"), help="run directory"),
             method: str = typer.Option("saliency", help="saliency, fisher or activation"),
             units: str = typer.Option("neuron", help="neuron or head"),
             k: int = typer.Option(256, help="units in the mask (top-k)"),
             per_layer: bool = typer.Option(False, "--per-layer", help="top-k within each layer"),
             device: str = DEVICE, force: bool = FORCE) -> None:
    """Score MLP neurons and heads on forget vs retain prompts; write scores, a mask and heatmaps."""
    from excise.recipes.concept_unlearn import run_concept

    cfg = _cfg(model=model, concept=concept, device=device, units=units,
               localize={"method": method}, select={"method": "topk", "k": k, "per_layer": per_layer})
    run_concept(cfg, out, force=force, console=_console(), stop_after="localize")


@app.command()
def unlearn(model: str = MODEL, concept: str = CONCEPT, out: Path = typer.Option(Path("runs/concept_unlearn"), help="run directory"),
            objective: str = typer.Option("npo", help="grad_ascent, idk or npo"),
            steps: int = typer.Option(15, help="optimizer steps"), lr: float = typer.Option(1e-3, help="learning rate"),
            method: str = typer.Option("saliency", help="localizer for the mask: saliency, fisher or activation"),
            units: str = typer.Option("neuron", help="neuron or head"), k: int = typer.Option(256, help="units in the mask"),
            device: str = DEVICE, force: bool = FORCE, set_: list[str] = SET) -> None:
    """Screen, measure, localize, train one masked LoRA, measure again; saves the adapter + mask."""
    from excise.recipes.concept_unlearn import run_concept

    cfg = _cfg(set_, model=model, concept=concept, device=device, units=units, localize={"method": method},
               select={"method": "topk", "k": k}, unlearn={"objective": objective, "steps": steps, "lr": lr})
    res = run_concept(cfg, out, force=force, console=_console())
    _console().print(f"adapter: {Path(res['dir']) / 'unlearn' / 'adapter'}")


@app.command("run")
def run_(model: Optional[str] = typer.Option(None, "--model", help="model (default: the recipe's, else smollm2-135m-instruct)"),
         concept: Optional[str] = typer.Option(None, "--concept", help="concept spec (default: the recipe's, else inception)"), out: Path = typer.Option(Path("runs/concept_compare"), help="run directory"),
         recipe: Optional[Path] = typer.Option(None, help="a concept recipe YAML; its settings are the defaults"),
         device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the recipe's, else cpu)"),
         quick: bool = typer.Option(False, "--quick", help="small smoke run"), force: bool = FORCE,
         set_: list[str] = SET) -> None:
    """The whole workflow with the comparison (masked vs plain LoRA vs full fine-tuning, mask sources, relearning)."""
    from excise.config import apply_overrides, load_yaml, validate
    from excise.recipes.concept_config import ConceptUnlearnConfig
    from excise.recipes.concept_unlearn import run_recipe

    data: dict = {}
    src = "command line"
    if recipe is not None:
        data = load_yaml(recipe) or {}
        data.pop("workflow", None)
        data.pop("out", None)
        src = str(recipe)
    data.update({k: v for k, v in {"model": model, "concept": concept, "device": device}.items() if v is not None})
    data["compare"] = True
    data = apply_overrides(data, set_)
    validate(ConceptUnlearnConfig, data, src)
    run_recipe(data, out, force=force, quick=quick, source=src, console=_console())
