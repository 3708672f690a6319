"""Concept unlearning with activation-guided masked LoRA: screen -> before -> localize -> unlearn -> after [-> compare].

Stages (each a resumable folder of the run directory):

* ``screen``: fix the training and evaluation pools (:mod:`excise.recipes.concept_splits`: held-out
  direct probes and retain evaluation items), keep the items the base model leaks on / answers
  correctly; report counts.
* ``before``: knowledge measures of the base model (leak per family, answer probability,
  retain accuracy on the screened and on the unscreened items, neutral perplexity; n and 95% CIs).
* ``localize``: saliency / Fisher / activation scores at MLP neurons and heads (training forget items
  against ``retain_train``), a mask, heatmaps.
* ``unlearn``: one masked-LoRA run (saved as a PEFT adapter + ``unit_mask.safetensors``), with the
  proof that units outside the mask and all base weights are unchanged.
* ``after``: the same measures on the unlearned model, and the before/after table.
* ``tofu`` (``concept: knowledge``): TOFU's metrics of the organism, the unlearned model and the
  oracle (:mod:`excise.recipes.concept_knowledge`); the comparison adds one column per variant.
* ``compare`` (``compare: true``): masked LoRA (saliency, Fisher, random masks of the same size)
  vs plain LoRA vs full fine-tuning at equal steps, each with a relearning check (trained on the
  training forget items, checked on held-out probes).

Settings live in :mod:`excise.recipes.concept_config`, tables and figures in
:mod:`excise.recipes.concept_report`; this module runs the stages.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from excise.config import setting_error, validate
from excise.errors import ExciseError
from excise.intervene.masked_lora import load_masked_lora
from excise.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_json
from excise.locate.saliency import score_units
from excise.measure.unlearning import evaluate
from excise.models import load
from excise.recipes.concept_compare import adopt_finished, localizers, run_comparison, train_variant
from excise.recipes.concept_config import ConceptUnlearnConfig, quick_variant
from excise.recipes.concept_knowledge import (KNOWLEDGE, knowledge_source, oracle_reference, organism_reference, tofu,
                                              write_tofu)
from excise.recipes.concept_report import write_before_after
from excise.recipes.concept_splits import prepare
from excise.report.html import end_of_run
from excise.report.plots import heatmap
from excise.resume import Points
from excise.run import Run, seed_everything
from excise.select import Mask, select
from excise.tasks.concepts import ConceptItem, ConceptSpec, load_concept

__all__ = ["ConceptUnlearnConfig", "run_concept", "run_recipe"]


def _check_k(cfg: ConceptUnlearnConfig, anatomy: Any, source: str) -> None:
    """Top-k must ask for no more units than the model has (else the mask would silently hold fewer)."""
    per = anatomy.d_mlp if cfg.units == "neuron" else anatomy.n_heads
    n = per if cfg.select.per_layer else anatomy.n_layers * per
    if cfg.select.method == "topk" and cfg.select.k > n:
        raise setting_error(source, ("select", "k"), f"{cfg.select.k} {cfg.units}s asked for, but the model has {n}"
                            f"{' per layer' if cfg.select.per_layer else ''}")


def run_concept(cfg: ConceptUnlearnConfig, out: str | Path, *, force: bool = False, quick: bool = False,
                console: Any = None, stop_after: str | None = None, source: str = "command line") -> dict:
    """Run the workflow's stages in ``out`` (resumable); ``stop_after="localize"`` stops after localization."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = console.print if console is not None else (lambda *a, **k: None)
    org, model_id = None, cfg.model
    if cfg.concept == KNOWLEDGE:  # the knowledge organism: its model, its spec, TOFU metrics against its oracle
        org, spec_full, model_id = knowledge_source(cfg, console)
    else:
        spec_full = load_concept(cfg.concept)
    seed_everything(cfg.seed)
    # the comparison is an add-on stage: its settings are not part of the run's identity, so
    # `compare: true` on a finished default run resumes it and only adds the `compare` stage
    run = Run(out, {"workflow": "concept", "quick": quick, "splits": "heldout-v1",
                    **cfg.model_dump(exclude={"compare", "comparison"})}, force=force)
    t_start = time.time()
    handle = load(model_id, dtype=cfg.dtype, device=cfg.device)
    _check_k(cfg, handle.anatomy, source)
    say(f"[bold]concept[/] {spec_full.name} on {model_id} -> {run.dir}")
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        res = run.stage(name, fn)
        timings[name] = round(time.time() - t0, 1)
        if res.skipped:  # keep the time the stage took when it ran
            timings[name] = read_json(res.dir / "stage.json").get("seconds", timings[name])
        say(f"  stage {name}: {'resumed' if res.skipped else 'done'} ({timings[name]} s)")
        return res

    # --- screen ---------------------------------------------------------------------------
    def st_screen(d: Path) -> dict:
        spec = spec_full
        if quick:
            cut = lambda xs, n: xs[:n]  # noqa: E731
            spec = spec.model_copy(update={"forget": cut(spec.forget, 4), "forget_eval": cut(spec.forget_eval, 4),
                                           "paraphrases": cut(spec.paraphrases, 4),
                                           "adversarial": cut(spec.adversarial[::3], 6), "retain": cut(spec.retain[::3], 8),
                                           "neutral": cut(spec.neutral, 4)})
        filtered, unscreened, report, before = prepare(handle, spec, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                                                       keep_all=not cfg.screen)
        atomic_write_json(d / "spec_kept.json", filtered.model_dump())
        atomic_write_json(d / "retain_unscreened.json", [it.model_dump() for it in unscreened])
        atomic_write_json(d / "base_generations.json", before)
        atomic_write_jsonl(d / "items.jsonl", report.pop("items"))
        atomic_write_json(d / "kept.json", report)
        return {k: v for k, v in report.items() if k == "splits" or (isinstance(v, dict) and "kept" in v)}

    timed("screen", st_screen)
    spec = ConceptSpec.model_validate(read_json(run.stage_dir("screen") / "spec_kept.json"))
    unscreened = [ConceptItem.model_validate(x) for x in read_json(run.stage_dir("screen") / "retain_unscreened.json")]
    base_gens = read_json(run.stage_dir("screen") / "base_generations.json")
    mnt = cfg.max_new_tokens

    # --- before ---------------------------------------------------------------------------
    def st_before(d: Path) -> dict:
        ev = evaluate(handle, spec, max_new_tokens=mnt, seed=cfg.seed, generations=base_gens, retain_unscreened=unscreened)
        atomic_write_jsonl(d / "items.jsonl", ev["items"])
        return ev["metrics"]

    before = timed("before", st_before).metrics

    # --- localize -------------------------------------------------------------------------
    def st_localize(d: Path) -> dict:
        info = {}
        for method in localizers(cfg):
            t0 = time.time()
            sc = score_units(handle, spec.forget, spec.retain_train, cfg.localize.model_copy(update={"method": method}))
            for kind, s in sc.items():
                s.save(str(d / f"scores_{method}_{kind}.safetensors"))
            mask = select(sc[cfg.units], cfg.select)
            torch.save(mask.values, d / f"mask_{method}.pt")
            v = sc["head"].values.numpy()
            heatmap(v, d / f"saliency_heads_{method}.png", title=f"{method} score per head ({spec.name})",
                    xlabel="head", ylabel="layer", cmap="magma", annotate=True)
            n = sc["neuron"].values
            top = torch.sort(n, dim=1, descending=True).values[:, :64].numpy()
            heatmap(top, d / f"saliency_neurons_{method}.png", title=f"{method}: top-64 neuron scores per layer (sorted)",
                    xlabel="rank within layer", ylabel="layer", cmap="magma")
            per_layer = mask.values.sum(1).tolist()
            heatmap(mask.values.float().numpy()[:, : min(mask.values.shape[1], 1536)], d / f"mask_{method}.png",
                    title=f"{method} mask ({mask.n_selected} {cfg.units}s)", xlabel=cfg.units, ylabel="layer", cmap="Greys")
            info[method] = {"n_selected": mask.n_selected, "per_layer": per_layer, "seconds": round(time.time() - t0, 1),
                            "top_units": [{"layer": l, "unit": i, "score": s} for (l, i), s in sc[cfg.units].ranked(10)]}
        atomic_write_json(d / "localize.json", info)
        return {m: {"n_selected": i["n_selected"], "seconds": i["seconds"]} for m, i in info.items()}

    timed("localize", st_localize)
    loc_dir = run.stage_dir("localize")
    if stop_after == "localize":
        return {"dir": str(run.dir), "before": before, "localize": read_json(loc_dir / "localize.json")}

    def mask_for(method: str):
        f = loc_dir / f"mask_{method}.pt"
        if not f.exists():  # a comparison added to a finished default run: score with the other localizer now
            f = run.dir / "compare_masks" / f"mask_{method}.pt"
            if not f.exists():
                sc = score_units(handle, spec.forget, spec.retain_train, cfg.localize.model_copy(update={"method": method}))
                buf = io.BytesIO()
                torch.save(select(sc[cfg.units], cfg.select).values, buf)
                atomic_write_bytes(f, buf.getvalue())
        return Mask(cfg.units, torch.load(f, weights_only=True))

    base_model = handle.model

    # --- unlearn + after ------------------------------------------------------------------
    variant0 = f"masked_{cfg.localize.method}"
    state: dict[str, Any] = {}

    def st_unlearn(d: Path) -> dict:
        model, info = train_variant(handle, base_model, spec, cfg, variant0, mask_for, adapter_dir=d / "adapter",
                                    log_path=d / "train_log.jsonl",
                                    checkpoint_dir=run.checkpoint_dir(f"unlearn-{variant0}"))
        state["model"] = model
        vh = handle.with_model(model)
        t0 = time.time()
        ev = evaluate(vh, spec, max_new_tokens=mnt, seed=cfg.seed, retain_unscreened=unscreened)
        info["eval_seconds"] = round(time.time() - t0, 1)
        atomic_write_jsonl(d / "items.jsonl", ev["items"])
        atomic_write_json(d / "after_metrics.json", ev["metrics"])
        atomic_write_json(d / "info.json", info)
        return info

    un = timed("unlearn", st_unlearn)
    after = read_json(un.dir / "after_metrics.json")
    info0 = read_json(un.dir / "info.json")

    def unlearned_model() -> Any:
        model = state.get("model")  # trained in this process, else the saved adapter
        return model if model is not None else load_masked_lora(copy.deepcopy(base_model), un.dir / "adapter").model

    if org is not None:
        def st_tofu(d: Path) -> dict:
            res = {"organism": organism_reference(handle, org), variant0: tofu(handle, org, model=unlearned_model()),
                   "oracle": oracle_reference(org)}
            return write_tofu(d, res, f"TOFU metrics on the knowledge organism ({variant0}, {cfg.unlearn.objective}, "
                                      f"{cfg.unlearn.steps} steps)")

        timed("tofu", st_tofu)

    def st_report(d: Path) -> dict:
        kept = read_json(run.stage_dir("screen") / "kept.json")
        targets = write_before_after(d, cfg, spec.name, variant0, kept, before, after, info0)
        return {"targets": targets, "seconds": timings}

    rep = timed("report", st_report)
    result = {"dir": str(run.dir), "before": before, "after": after, "info": info0,
              "targets": rep.metrics.get("targets") if rep.metrics else None}

    # --- comparison -----------------------------------------------------------------------
    if cfg.compare:
        cmp_dir = run.stage_dir("compare")
        points = Points(run.checkpoint_dir("compare"))
        now = json.loads(cfg.comparison.model_dump_json())
        if run.is_done("compare"):
            prev = read_json(cmp_dir / "comparison_settings.json")
            if prev != now:
                same_but_variants = {k: v for k, v in prev.items() if k != "variants"} == \
                    {k: v for k, v in now.items() if k != "variants"}
                if not (same_but_variants or force):
                    raise ExciseError(f"{cmp_dir} holds a comparison with other settings; pass --force or choose another --out")
                if same_but_variants:  # a longer (or shorter) variant list: keep what was measured
                    kept = adopt_finished(cmp_dir, cfg.comparison.variants, points)
                    say(f"  compare: keeping {len(kept)} finished variant(s) ({', '.join(kept) or 'none'})")
                shutil.rmtree(cmp_dir)

        def st_compare(d: Path) -> dict:
            atomic_write_json(d / "comparison_settings.json", now)
            return run_comparison(d, cfg=cfg, handle=handle, base_model=base_model, spec=spec, org=org,
                                  unscreened=unscreened, before=before, variant0=variant0, after=after, info0=info0,
                                  unlearn_dir=un.dir, unlearned_model=unlearned_model, mask_for=mask_for, points=points,
                                  tofu_dir=run.stage_dir("tofu") if org is not None else None, say=say)

        cmp_ = timed("compare", st_compare)
        result["compare"] = cmp_.metrics
    timings["total"] = round(time.time() - t_start, 1)
    atomic_write_json(run.dir / "timings.json", timings)
    result["seconds"] = timings
    say(f"done in {timings['total']} s: {run.dir}")
    result["report_html"] = end_of_run(run.dir, console)
    return result


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(ConceptUnlearnConfig, settings, source)
    if quick:
        cfg = quick_variant(cfg)
    return run_concept(cfg, out, force=force, quick=quick, console=console, source=source)
