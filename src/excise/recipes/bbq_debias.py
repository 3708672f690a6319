"""The BBQ workflow: evaluate, localize heads, soft-prune, fine-tune, re-evaluate on held-out items.

Stages of one run directory (each resumable, written atomically):

``eval_before``   predictions + BBQ bias scores (s_DIS, s_AMB, accuracies, per category, CIs) on
                  held-out items (templates never used for localization or training).
``localize``      head attribution on ambiguous/disambiguated pairs of the train templates
                  (``excise.locate.heads``): ranked ``heads.csv``, layer x head heatmaps, and
                  activation heatmaps (hidden states, MLP outputs, attention of every head).
``mitigate``      the selected heads soft-pruned (scale 0.2 by default, a hook, not removal),
                  then a LoRA fine-tune on disambiguated train items with the heads pruned;
                  the mitigated model (head scales + adapter) saved in ``mitigate/model``.
``eval_after``    the mitigated model reloaded with one call (:func:`load_mitigated`), checked to
                  give the same outputs as the in-memory one, re-evaluated on the same held-out
                  items; activation heatmaps after.
``report``        ``unlearning_results.csv`` (before/after per category with CIs), ``summary.json``.

``model: biased`` runs it on the biased organism (``excise.organisms.biased_bbq``): evaluation on
the templates it never saw, localization and fine-tuning on its training templates, and no item
used to build it anywhere. ``model: planted`` runs the workflow on the planted-bias model
(``excise.organisms.planted``), whose implanted heads are known, and adds precision@k against them.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, Field, model_validator

from excise.config import Device, setting_error, validate
from excise.errors import ExciseError
from excise.intervene.heads import HeadScales, scale_heads
from excise.intervene.lora import (ChoiceExample, FinetuneConfig, base_state, finetune,
                                   load_mitigated as _load_mitigated, save_mitigated)
from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from excise.locate.heads import MIN_PAIRS, HeadAttributionConfig, attribute_heads, pair_items, save_attribution
from excise.measure.bbq import bias_scores
from excise.models import load
from excise.organisms.biased_bbq import BIASED, BiasedConfig, build_biased, check_unused, organism_split, training_examples
from excise.organisms.planted import PlantedConfig, build_planted, planted_heads
from excise.recipes.bbq_eval import predict, save_predictions
from excise.recipes.bbq_report import activation_maps, summarize, summary_text, unlearning_rows
from excise.report.html import end_of_run
from excise.run import Run, seed_everything
from excise.select import SelectConfig, select
from excise.tasks.bbq import CATEGORIES, check_category_list, load_bbq, sample_bbq, split_items
from excise.tasks.bbq_prompts import loglik_options, loglik_prompt

PLANTED = "planted"


def _default_finetune() -> FinetuneConfig:
    return FinetuneConfig(method="lora", objective="choice", steps=12, batch_size=8, lr=1e-3)


class BBQDebiasConfig(BaseModel):
    """Settings of the BBQ debiasing workflow."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory, hub id, "
                                                            "'biased' (the biased organism) or 'planted'")
    categories: Annotated[list[str] | None, AfterValidator(check_category_list)] = Field(
        None, description="BBQ categories (None: all 11)")
    per_category: int = Field(24, ge=4, description="held-out evaluation items per category (stratified)")
    scoring: Literal["loglik", "letter", "generate"] = Field(
        "loglik", description="evaluation scoring mode (localization and fine-tuning always use option log-likelihoods)")
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of split units held out for evaluation")
    split_by: Literal["template", "names"] | None = Field(
        None, description="held-out unit: whole templates, or a template's pair of answer entities (None: template, "
                          "or for model=planted the split its planted settings name, so its training items stay unseen)")
    pairs_per_category: int = Field(8, ge=1, description="ambiguous/disambiguated train pairs per category for localization")
    finetune_per_category: int = Field(16, ge=1, description="train items per category for the fine-tune")
    finetune_on: Literal["disambig", "both"] = Field(
        "disambig", description="fine-tune items: disambiguated ones (the seed's method), or both conditions "
                                "(ambiguous ones then teach the 'unknown' answer), each with its correct answer")
    localize: HeadAttributionConfig = Field(default_factory=HeadAttributionConfig, description="head localizer")
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(method="topk", k=3),
                                 description="which heads to prune (top-k or threshold over the head scores)")
    head_scale: float = Field(0.2, ge=0, le=1, description="soft-pruning scale of selected heads (0 removes them)")
    finetune: FinetuneConfig = Field(default_factory=_default_finetune, description="fine-tune after pruning")
    do_finetune: bool = Field(True, description="run the fine-tune stage (False: soft-pruning only)")
    planted: PlantedConfig = Field(default_factory=PlantedConfig, description="how the planted model is built (model=planted)")
    biased: BiasedConfig = Field(default_factory=BiasedConfig, description="how the biased organism is built "
                                                                           "(model=biased; its split replaces eval_fraction)")
    trace_items: int = Field(4, ge=1, description="prompts traced for the activation heatmaps")
    batch_size: int = Field(8, ge=1, description="items per forward pass in evaluation")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples for the bias-score CIs")
    data_dir: str | None = Field(None, description="BBQ data directory (None: the packaged copy)")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    seed: int = Field(0, description="one seed for sampling, training and bootstrap")

    @model_validator(mode="after")
    def _resolve_split(self) -> "BBQDebiasConfig":
        if self.split_by is None:
            self.split_by = self.planted.split_by if self.model == PLANTED else "template"
        if self.model == BIASED and self.categories is None:
            self.categories = list(self.biased.categories)
        return self


# --- data ------------------------------------------------------------------------------------------

def workflow_items(cfg: BBQDebiasConfig) -> dict[str, list[Any]]:
    """Held-out eval sample, train pairs for localization, disambiguated train items for the fine-tune."""
    items = load_bbq(cfg.categories, data_dir=cfg.data_dir)
    if cfg.model == BIASED:  # the organism's own split; the items it was built from are used nowhere
        parts = organism_split(cfg.biased, items)
        used = {(x.category, x.example_id) for x in training_examples(cfg.biased, parts["train"])[1]}
        train = [x for x in parts["train"] if (x.category, x.example_id) not in used]  # held-out names: the check
        held = parts["heldout_templates"]
    else:
        train, held = split_items(items, cfg.eval_fraction, cfg.seed, cfg.split_by)
    eval_items = sample_bbq(held, cfg.per_category, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    pairs: list[Any] = []
    ft: list[Any] = []
    cats = sorted({x.category for x in train})
    for c in cats:
        tc = [x for x in train if x.category == c and x.target_loc is not None]
        cp = pair_items(tc)
        rng.shuffle(cp)
        # balance polarities: alternate neg / nonneg pairs
        neg = [p for p in cp if p[0].question_polarity == "neg"]
        non = [p for p in cp if p[0].question_polarity == "nonneg"]
        mixed = [p for q in zip(neg, non) for p in q] + neg[len(non):] + non[len(neg):]
        pairs += mixed[: cfg.pairs_per_category]
        used = {id(x) for p in pairs for x in p}
        pool = [x for x in tc if (cfg.finetune_on == "both" or x.context_condition == "disambig") and id(x) not in used]
        ft += sample_bbq(pool, cfg.finetune_per_category, seed=cfg.seed + 7)
    if not eval_items:
        raise ExciseError("no held-out BBQ items: check categories and eval_fraction")
    return {"eval": eval_items, "pairs": [x for p in pairs for x in p], "finetune": ft}


def _ids(items: Sequence[Any]) -> list[list[Any]]:
    return [[x.category, x.example_id] for x in items]


# --- the workflow ----------------------------------------------------------------------------------

def planted_config(cfg: BBQDebiasConfig) -> PlantedConfig:
    """The planted model's settings, sharing the workflow's split so its training items are never evaluated."""
    return cfg.planted.model_copy(update={"split_by": cfg.split_by, "eval_fraction": cfg.eval_fraction,
                                          "seed": cfg.seed})


def _load(cfg: BBQDebiasConfig, console: Any = None, load_base: Any = None) -> tuple[Any, list[tuple[int, int]] | None]:
    if load_base is not None:
        return load_base(), None
    if cfg.model == BIASED:
        d = build_biased(cfg.biased, console=console, device=cfg.device)
        h = load(str(d), device=cfg.device, dtype=cfg.dtype, attn_implementation="eager")
        h.name = str(d)
        return h, None
    if cfg.model == PLANTED:
        d = build_planted(planted_config(cfg), console=console)
        h = load(str(d), device=cfg.device, dtype=cfg.dtype, attn_implementation="eager")
        h.name = str(d)
        return h, planted_heads(d)
    return load(cfg.model, device=cfg.device, dtype=cfg.dtype, attn_implementation="eager"), None


def _evaluate(handle: Any, items: Sequence[Any], cfg: BBQDebiasConfig, d: Path, title: str) -> Any:
    rows = predict(handle, list(items), cfg.scoring, batch_size=cfg.batch_size)
    save_predictions(d / "predictions.jsonl", rows)
    rep = bias_scores(rows, n_boot=cfg.n_boot, seed=cfg.seed)
    rep.save(d, title=title)
    return rep


def _metrics(rep: Any) -> dict[str, Any]:
    o = rep.overall
    return {m: getattr(o, m).as_dict() for m in ("s_amb", "s_dis", "acc_ambig", "acc_disambig")} | {"n": o.n}


def run_bbq(cfg: BBQDebiasConfig, out: str | Path, *, force: bool = False, console: Any = None,
            stages: Sequence[str] = ("eval_before", "localize", "mitigate", "eval_after", "report"),
            load_base: Any = None, source: str = "command line") -> dict:
    """Run the workflow (or the first few stages) in ``out``; returns the summary dict.

    ``load_base`` (a no-argument callable returning a handle) replaces loading ``cfg.model``, for
    in-memory models; it is called again to reload the mitigated model on top of a fresh base.
    """
    bad = [c for c in (cfg.categories or []) if c not in CATEGORIES]
    if bad:  # fail before loading anything
        raise ExciseError(f"unknown BBQ category '{bad[0]}'; choose from {', '.join(CATEGORIES)}")
    t_start = time.time()
    seed_everything(cfg.seed)
    run = Run(out, {"workflow": "bbq", **cfg.model_dump(mode="json")}, force=force)
    say = console.print if console is not None else (lambda *a, **k: None)
    data = workflow_items(cfg)  # data first (cheap), then the model: both before the first write
    need = MIN_PAIRS * (2 if cfg.localize.split else 1)
    if "localize" in stages and not run.is_done("localize") and len(data["pairs"]) // 2 < need:
        raise setting_error(source, ("pairs_per_category",), f"head localization needs at least {need} ambiguous/"
                            f"disambiguated pairs in all (half choose heads, half measure them); the data gives "
                            f"{len(data['pairs']) // 2} "
                            f"(pairs_per_category={cfg.pairs_per_category}); raise it or add categories")
    handle, truth = _load(cfg, console, load_base)
    if cfg.model == BIASED:
        check_unused(handle.name, data)
    _check_selection(cfg, handle.anatomy, source)
    say(f"[bold]{cfg.model}[/]: {len(data['eval'])} held-out eval items, {len(data['pairs']) // 2} localization pairs, "
        f"{len(data['finetune'])} fine-tune items")
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.time()
        res = run.stage(name, fn)
        timings[name] = round(time.time() - t0, 1)
        say(f"  {name}: {'resumed' if res.skipped else 'done'} ({timings[name]} s)")
        return res

    # 1. evaluate before
    def eval_before(d: Path) -> dict:
        atomic_write_json(d / "items.json", {k: _ids(v) for k, v in data.items()})
        rep = _evaluate(handle, data["eval"], cfg, d, f"{cfg.model}: before mitigation")
        return _metrics(rep)

    if "eval_before" in stages:
        timed("eval_before", eval_before)

    # 2. localize
    def localize(d: Path) -> dict:
        att = attribute_heads(handle, data["pairs"], cfg.localize, progress=console is not None)
        save_attribution(att, d, title=f"{cfg.model}:")
        mask = select(att.scores, cfg.select)
        heads = mask.units()
        atomic_write_json(d / "selected_heads.json", {"heads": heads, "select": cfg.select.model_dump()})
        activation_maps(handle, data["eval"][: cfg.trace_items], d, "before")
        m = {"selected_heads": heads, "n_pairs": att.n_pairs, "base_logodds_ambig": att.base_logodds,
             "top_heads": [r for r in att.rows()[:10]]}
        if truth is not None:
            m["planted_heads"] = [list(h) for h in truth]
            m["precision_at_k"] = att.precision_at_k(truth)
        return m

    if "localize" in stages:
        loc = timed("localize", localize).metrics
    # 3. mitigate
    def mitigate(d: Path) -> dict:
        heads = _selected_heads(run.stage_dir("localize") / "selected_heads.json", handle.anatomy)
        scales = HeadScales.from_heads(handle.anatomy, heads, cfg.head_scale)
        m: dict[str, Any] = {"pruned_heads": [list(h) for h in heads], "head_scale": cfg.head_scale}
        if cfg.do_finetune:
            ex = [ChoiceExample(loglik_prompt(x), tuple(loglik_options(x)), int(x.label)) for x in data["finetune"]]
            base_sd = {k: v.detach().clone() for k, v in base_state(handle.model).items()}
            res = finetune(handle, ex, cfg.finetune, head_scales=scales, progress=console is not None,
                           checkpoint_dir=run.checkpoint_dir("mitigate") if cfg.finetune.checkpoint_every else None)
            m["finetune"] = res.summary()
            # an adapter method proves the base weights did not change
            base_now = base_state(handle.model)
            if cfg.finetune.method == "lora":
                if base_now.keys() != base_sd.keys():
                    raise ExciseError("the adapter changed the base model's parameter set")
                m["base_weights_max_change"] = max(float((base_now[k] - base_sd[k]).abs().max()) for k in base_sd)
        save_mitigated(handle, d / "model", head_scales=scales, base=cfg.model if cfg.model not in (PLANTED, BIASED) else handle.name,
                       meta={"name": f"{cfg.model}+mitigated", "pruned_heads": [list(h) for h in heads]})
        # outputs of the in-memory mitigated model, for the reload check
        ref = _probe(handle, data["eval"][:4], scales)
        torch.save(ref, d / "probe_logits.pt")
        return m

    if "mitigate" in stages:
        timed("mitigate", mitigate)

    # 4. evaluate after (the reloaded model)
    def eval_after(d: Path) -> dict:
        mdir = run.stage_dir("mitigate") / "model"
        mh = load_mitigated(mdir, device=cfg.device, dtype=cfg.dtype,
                            base_handle=load_base() if load_base is not None else None)
        ref = torch.load(run.stage_dir("mitigate") / "probe_logits.pt", weights_only=True)
        got = _probe(mh, data["eval"][:4], None)
        reload_diff = float((ref - got).abs().max())
        rep = _evaluate(mh, data["eval"], cfg, d, f"{cfg.model}: after mitigation")
        activation_maps(mh, data["eval"][: cfg.trace_items], d, "after")
        return _metrics(rep) | {"reload_max_abs_diff": reload_diff}

    if "eval_after" in stages:
        timed("eval_after", eval_after)

    summary: dict[str, Any] = {}

    def report(d: Path) -> dict:
        before = read_json(run.stage_dir("eval_before") / "bias_scores.json")
        after = read_json(run.stage_dir("eval_after") / "bias_scores.json")
        rows = unlearning_rows(before, after)
        atomic_write_csv(d / "unlearning_results.csv", rows)
        loc_m = read_json(run.stage_dir("localize") / "metrics.json")
        mit_m = read_json(run.stage_dir("mitigate") / "metrics.json")
        aft_m = read_json(run.stage_dir("eval_after") / "metrics.json")
        s = summarize(cfg.model, before["overall"], after["overall"], loc_m, mit_m, aft_m)
        atomic_write_json(d / "summary.json", s)
        atomic_write_text(d / "summary.txt", summary_text(s))
        return s

    if "report" in stages:
        res = timed("report", report)
        summary = res.metrics or {}
        summary["seconds"] = round(time.time() - t_start, 1)
        summary["stage_seconds"] = timings
    summary["report_html"] = end_of_run(run.dir, console)
    return summary


def _check_selection(cfg: BBQDebiasConfig, anatomy: Any, source: str) -> None:
    """Top-k must ask for no more heads than the model has (else it would silently select fewer)."""
    n = anatomy.n_heads if cfg.select.per_layer else anatomy.n_layers * anatomy.n_heads
    if cfg.select.method == "topk" and cfg.select.k > n:
        raise setting_error(source, ("select", "k"), f"{cfg.select.k} heads asked for, but the model has {n} "
                            f"({anatomy.n_layers} layers x {anatomy.n_heads} heads"
                            f"{', per layer' if cfg.select.per_layer else ''})")


def _selected_heads(path: Path, anatomy: Any) -> list[tuple[int, int]]:
    """The localize stage's heads, checked: a resumed run may hold a hand-edited or damaged file."""
    raw = read_json(path)
    heads = raw.get("heads") if isinstance(raw, dict) else None
    if not isinstance(heads, list):
        raise ExciseError("expected {'heads': [[layer, head], ...]}", where=f"{path}:heads")
    out = []
    for i, h in enumerate(heads):
        ok = (isinstance(h, list) and len(h) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in h)
              and 0 <= h[0] < anatomy.n_layers and 0 <= h[1] < anatomy.n_heads)
        if not ok:
            raise ExciseError(f"expected [layer, head] integers within {anatomy.n_layers} layers x {anatomy.n_heads} "
                              f"heads, got {h!r}; pass --force to start over", where=f"{path}:heads.{i}")
        out.append((h[0], h[1]))
    return out


def _probe(handle: Any, items: Sequence[Any], scales: Any) -> Any:
    """Last-token logits of a few prompts (with the head scales attached when given)."""
    batch = handle.encode([loglik_prompt(x) for x in items])
    hook = scale_heads(handle, scales) if scales is not None else None
    try:
        with torch.inference_mode():
            logits = handle.model(**batch).logits
    finally:
        if hook is not None:
            hook.remove()
    last = batch["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(items)), last].float().cpu()


def load_mitigated(directory: str | Path, *, device: str = "cpu", dtype: str = "float32", base_handle: Any = None) -> Any:
    """Reload a mitigated model (base + head scales + LoRA adapter) in one call; see ``excise.intervene.lora``."""
    return _load_mitigated(directory, device=device, dtype=dtype, attn_implementation="eager", base_handle=base_handle)


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    """`excise run recipes/bbq_debias.yaml`: validate the settings and run the workflow."""
    cfg = validate(BBQDebiasConfig, settings, source)
    if quick:
        cfg = cfg.model_copy(update={"per_category": min(cfg.per_category, 8), "pairs_per_category": min(cfg.pairs_per_category, 6),
                                     "finetune": cfg.finetune.model_copy(update={"steps": min(cfg.finetune.steps, 3)})})
    s = run_bbq(cfg, out, force=force, console=console, source=source)
    if console is not None and s:
        console.print(summary_text(s), markup=False, highlight=False, soft_wrap=True)
    return s
