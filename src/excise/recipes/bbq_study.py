"""The BBQ study on the biased organism: does the bias generalize, where does it live, does
localization help mitigation, and does the mitigation survive a relearning attack?

Stages of one run directory (each resumable, written atomically):

``organism``        build (or find cached) the biased organism (:mod:`excise.organisms.biased_bbq`).
``generalization``  base and organism on held-out templates and on held-out entity names, per
                    category, with CIs: is the bias large, does it generalize, is disambiguated
                    accuracy kept?
``truth_<model>``   causal ground truth on the organism and on the base: every head and every MLP
                    layer really ablated on held-out ambiguous items; the cheap localizers (Pearson
                    context sensitivity, attribution patching, activation norm, and a random ranking)
                    scored by precision@k and Spearman against it, with bootstrap CIs over items.
``localize``        the workflow's head localizer on the organism (selection half of the pairs
                    chooses candidates, measurement half measures them), top-k heads.
``cond_<name>``     one mitigation, evaluated on held-out templates, then attacked by relearning:
                    ``prune`` (soft-prune the localized heads), ``finetune`` (LoRA only),
                    ``prune_finetune`` (the seed's method), ``random_finetune`` (random heads of equal
                    count + LoRA, the control).
``report``          ``study.md``, ``mitigation.csv``, ``localizers.csv``, ``relearn.csv``, ``summary.json``.

Items: evaluation and ground truth come from templates the organism never saw (disjoint samples);
localization pairs and fine-tune items from its training templates, minus every item it was built
from; the held-out-names check from entity pairs it never saw. ``check_unused`` enforces it.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field

from excise.attack.relearn import RelearnConfig, relearn
from excise.config import Device, validate
from excise.intervene.heads import HeadScales, bake_head_scales
from excise.intervene.lora import ChoiceExample, FinetuneConfig, choice_loss, finetune
from excise.io import atomic_write_json, read_json
from excise.locate.causal_truth import (CHEAP, ablation_truth, cheap_views, random_scores, score_against_truth)
from excise.locate.heads import HeadAttributionConfig, attribute_heads, save_attribution
from excise.measure.bbq import bias_scores
from excise.models import load
from excise.organisms.biased_bbq import (BIASED, BiasedConfig, build_biased, check_unused, organism_info,
                                         organism_split, training_examples)
from excise.recipes.bbq_debias import BBQDebiasConfig, workflow_items
from excise.recipes.bbq_eval import predict, save_predictions
from excise.recipes.bbq_study_report import write_report as write_study_report
from excise.report.html import end_of_run
from excise.run import Run, seed_everything
from excise.select import SelectConfig, select
from excise.tasks.bbq import sample_bbq
from excise.tasks.bbq_prompts import loglik_options, loglik_prompt

CONDITIONS = ("prune", "finetune", "prune_finetune", "random_finetune")


class RelearnSweep(BaseModel):
    """The relearning attack on each mitigated model: LoRA on biased ambiguous items."""

    model_config = {"extra": "forbid"}
    lrs: list[float] = Field([1e-3, 3e-4], min_length=1, description="learning-rate sweep (the first is also repeated "
                                                                      "over every seed)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="seeds of the repeated runs at lrs[0]")
    steps: int = Field(24, ge=1, description="attack steps")
    eval_every: int = Field(8, ge=1, description="measure s_AMB every this many steps")
    batch_size: int = Field(8, ge=1, description="examples per attack step")
    n_items: int = Field(64, ge=1, description="biased ambiguous items the attacker holds (the organism's own)")
    eval_per_category: int = Field(24, ge=4, description="held-out items per category scored along the curve")
    reference: bool = Field(True, description="also attack the base model at lrs[0], seed 0 (how fast it learns the "
                                              "bias from scratch)")


class BBQStudyConfig(BaseModel):
    """Settings of the BBQ organism study (defaults: about an hour on two CPU cores)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    biased: BiasedConfig = Field(default_factory=BiasedConfig, description="the organism (its base is the base model)")
    per_category: int = Field(60, ge=4, description="held-out-template evaluation items per category")
    names_per_category: int = Field(40, ge=4, description="held-out-name items per category (generalization check)")
    truth_per_category: int = Field(6, ge=2, description="held-out ambiguous items per category for the ground truth")
    pairs_per_category: int = Field(16, ge=2, description="localization pairs per category (training templates)")
    finetune_per_category: int = Field(40, ge=1, description="fine-tune items per category (training templates)")
    finetune_on: str = Field("both", pattern="^(disambig|both)$", description="fine-tune items: disambig or both conditions")
    units: list[str] = Field(["head", "mlp"], description="unit kinds given a ground truth (head, mlp)")
    truth_models: list[str] = Field(["organism", "base"], description="models given a ground truth")
    k: int = Field(10, ge=1, description="precision@k for heads (MLP layers: k_mlp)")
    k_mlp: int = Field(3, ge=1, description="precision@k for MLP layers")
    localize: HeadAttributionConfig = Field(default_factory=lambda: HeadAttributionConfig(n_candidates=10),
                                            description="the workflow's head localizer")
    n_heads: int = Field(10, ge=1, description="heads pruned (top-k of the localizer; the random control prunes as many)")
    head_scale: float = Field(0.0, ge=0, le=1, description="pruning scale (0 removes the heads)")
    conditions: list[str] = Field(list(CONDITIONS), description="mitigations compared: " + ", ".join(CONDITIONS))
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(
        method="lora", objective="choice", steps=30, batch_size=8, lr=1e-3), description="the LoRA fine-tune")
    relearn: RelearnSweep = Field(default_factory=RelearnSweep, description="relearning attack")
    batch_size: int = Field(16, ge=1, description="items per forward pass")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    seed: int = Field(0, description="seed for samples, training and bootstrap")


def study_items(cfg: BBQStudyConfig) -> dict[str, list[Any]]:
    """Every pool of the study; disjoint, none holding an item the organism was built from."""
    wcfg = BBQDebiasConfig(model=BIASED, biased=cfg.biased, per_category=cfg.per_category,
                           pairs_per_category=cfg.pairs_per_category, finetune_per_category=cfg.finetune_per_category,
                           finetune_on=cfg.finetune_on, seed=cfg.seed)
    data = workflow_items(wcfg)
    parts = organism_split(cfg.biased)
    taken = {(x.category, x.example_id) for x in data["eval"]}
    rest = [x for x in parts["heldout_templates"] if x.context_condition == "ambig"
            and (x.category, x.example_id) not in taken]
    data["truth"] = sample_bbq(rest, cfg.truth_per_category, seed=cfg.seed + 11)
    data["names"] = sample_bbq(parts["heldout_names"], cfg.names_per_category, seed=cfg.seed)
    used = [x for x in training_examples(cfg.biased, parts["train"])[1] if x.context_condition == "ambig"]
    data["attack"] = random.Random(cfg.seed).sample(used, min(cfg.relearn.n_items, len(used)))
    data["relearn_eval"] = sample_bbq(data["eval"], cfg.relearn.eval_per_category, seed=cfg.seed + 3)
    return data


def _ids(items: Sequence[Any]) -> list[list[Any]]:
    return [[x.category, x.example_id] for x in items]


def _scores(handle: Any, items: Sequence[Any], cfg: BBQStudyConfig, d: Path | None, title: str,
            n_boot: int | None = None) -> Any:
    rows = predict(handle, list(items), "loglik", batch_size=cfg.batch_size)
    rep = bias_scores(rows, n_boot=n_boot or cfg.n_boot, seed=cfg.seed)
    if d is not None:
        save_predictions(d / "predictions.jsonl", rows)
        rep.save(d, title=title)
    return rep


def _overall(rep: Any) -> dict[str, Any]:
    o = rep.overall
    return {m: getattr(o, m).as_dict() for m in ("s_amb", "s_dis", "acc_ambig", "acc_disambig")}


def _with_model(handle: Any, model: Any) -> Any:
    h = copy.copy(handle)
    h.model = model
    return h


def run_study(cfg: BBQStudyConfig, out: str | Path, *, force: bool = False, console: Any = None) -> dict:
    """Run the study in ``out`` (resumable); returns the summary dict."""
    t0 = time.time()
    bad = [c for c in cfg.conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown condition '{bad[0]}'; choose from {', '.join(CONDITIONS)}")
    seed_everything(cfg.seed)
    run = Run(out, {"workflow": "bbq-study", **cfg.model_dump(mode="json")}, force=force)
    say = console.print if console is not None else (lambda *a, **k: None)
    data = study_items(cfg)
    organism_dir = build_biased(cfg.biased, console=console, device=cfg.device)  # cached after the first run
    check_unused(organism_dir, {k: v for k, v in data.items() if k != "attack"})

    def load_model(which: str) -> Any:
        h = load(str(organism_dir) if which == "organism" else cfg.biased.base, device=cfg.device,
                 attn_implementation="eager")
        h.name = which
        return h

    def timed(name: str, fn: Any) -> Any:
        s = time.time()
        res = run.stage(name, fn)
        say(f"  {name}: {'resumed' if res.skipped else 'done'} ({time.time() - s:.0f} s)")
        return res

    def organism_stage(d: Path) -> dict:
        atomic_write_json(d / "items.json", {k: _ids(v) for k, v in data.items()})
        info = organism_info(organism_dir)
        return {"dir": str(organism_dir), "build_seconds": info["seconds"], "train": info["train"],
                "n_examples": info["n_examples"], "pools": {k: len(v) for k, v in data.items()}}

    timed("organism", organism_stage)

    def generalization(d: Path) -> dict:
        m: dict[str, Any] = {}
        for which in ("base", "organism"):
            h = load_model(which)
            for part, items in (("templates", data["eval"]), ("names", data["names"])):
                sub = d / f"{which}_{part}"
                sub.mkdir(parents=True, exist_ok=True)
                rep = _scores(h, items, cfg, sub, f"{which}, held-out {part}")
                m[f"{which}_{part}"] = {"overall": _overall(rep),
                                        "groups": {g: {k: v.as_dict() for k, v in (("s_amb", s.s_amb),
                                                                                   ("acc_disambig", s.acc_disambig))}
                                                   for g, s in rep.groups.items()}}
        return m

    timed("generalization", generalization)

    for which in cfg.truth_models:
        def truth(d: Path, which: str = which) -> dict:
            h = load_model(which)
            m: dict[str, Any] = {"n_truth_items": len(data["truth"]), "n_pairs": len(data["pairs"]) // 2}
            for kind in cfg.units:
                t = ablation_truth(h, data["truth"], kind, batch_size=cfg.batch_size, progress=console is not None)
                t.save(d, f"truth_{kind}")
                views = cheap_views(h, data["pairs"], kind, batch_size=cfg.batch_size)
                views["random"] = random_scores(len(t.units), cfg.seed)
                k = cfg.k if kind == "head" else cfg.k_mlp
                m[kind] = {"top_effects": t.rows()[:10], "localizers": {}}
                for name, v in views.items():
                    sc = score_against_truth(v, t, k=k, n_boot=cfg.n_boot, seed=cfg.seed)
                    m[kind]["localizers"][name] = {"precision_at_k": sc["precision_at_k"].as_dict(),
                                                   "spearman": sc["spearman"].as_dict(), "k": sc["k"],
                                                   "chance_precision": sc["chance_precision"]}
            return m

        timed(f"truth_{which}", truth)

    def localize(d: Path) -> dict:
        h = load_model("organism")
        att = attribute_heads(h, data["pairs"], cfg.localize, progress=console is not None)
        save_attribution(att, d, title="organism:")
        heads = select(att.scores, SelectConfig(method="topk", k=cfg.n_heads)).units()
        an = h.anatomy
        rng = random.Random(cfg.seed)
        taken = {tuple(x) for x in heads}
        others = [(l, hh) for l in range(an.n_layers) for hh in range(an.n_heads) if (l, hh) not in taken]
        rand = sorted(rng.sample(others, len(heads)))
        atomic_write_json(d / "selected_heads.json", {"heads": heads, "random_heads": [list(x) for x in rand]})
        return {"heads": heads, "random_heads": [list(x) for x in rand], "n_selection_pairs": att.n_pairs,
                "n_measure_pairs": att.meta.get("n_measure_pairs")}

    loc = timed("localize", localize).metrics
    before = read_json(run.stage_dir("generalization") / "organism_templates" / "bias_scores.json")["overall"]

    for cond in cfg.conditions:
        def condition(d: Path, cond: str = cond) -> dict:
            h = load_model("organism")
            heads = loc["random_heads"] if cond == "random_finetune" else loc["heads"]
            prune = cond != "finetune"
            m: dict[str, Any] = {"condition": cond, "pruned_heads": heads if prune else []}
            if prune:  # baked: the mitigated model is plain weights, as an attacker would hold it
                bake_head_scales(h, HeadScales.from_heads(h.anatomy, [tuple(x) for x in heads], cfg.head_scale))
            if cond != "prune":
                ex = [ChoiceExample(loglik_prompt(x), tuple(loglik_options(x)), int(x.label)) for x in data["finetune"]]
                m["finetune"] = finetune(h, ex, cfg.finetune, progress=console is not None).summary()
                h.model = h.model.merge_and_unload()
            rep = _scores(h, data["eval"], cfg, d, f"organism after {cond}")
            m["after"] = _overall(rep)
            m["relearn"] = _attack(h, data, cfg, float(before["s_amb"]["value"]), console)
            return m

        timed(f"cond_{cond}", condition)

    if cfg.relearn.reference:
        def reference(d: Path) -> dict:
            h = load_model("base")
            return {"relearn": _attack(h, data, cfg, float(before["s_amb"]["value"]), console, reference=True)}

        timed("relearn_base", reference)

    def report(d: Path) -> dict:
        return write_study_report(run.dir, d, cfg)

    summary = timed("report", report).metrics or {}
    summary["seconds"] = round(time.time() - t0, 1)
    summary["report_html"] = end_of_run(run.dir, console)
    return summary


def _attack(handle: Any, data: dict, cfg: BBQStudyConfig, s_amb_organism: float, console: Any,
            reference: bool = False) -> list[dict]:
    """Relearning runs (lr x seed) from the same weights; each curve is s_AMB on held-out items."""
    rc = cfg.relearn
    pristine = handle.model  # each run attacks its own copy, so every curve starts from the same weights
    ex = [ChoiceExample(loglik_prompt(x), tuple(loglik_options(x)), int(x.target_loc)) for x in data["attack"]]
    runs = [(rc.lrs[0], s) for s in rc.seeds] + [(lr, rc.seeds[0]) for lr in rc.lrs[1:]]
    if reference:
        runs = runs[:1]
    out = []
    for lr, seed in runs:
        model = copy.deepcopy(pristine)
        rng = random.Random(seed)
        order = rng.sample(ex, len(ex))
        batches = [order[i:i + rc.batch_size] for i in range(0, len(order) - rc.batch_size + 1, rc.batch_size)]
        torch.manual_seed(seed)

        def check(model: Any) -> float:
            rep = _scores(_with_model(handle, model), data["relearn_eval"], cfg, None, "", n_boot=200)
            return rep.overall.s_amb.value / s_amb_organism if s_amb_organism else float("nan")

        res = relearn(model, batches, check,
                      RelearnConfig(steps=rc.steps, lr=lr, eval_every=rc.eval_every, threshold=1.0, mode="lora",
                                    lora=cfg.biased.lora),
                      loss_fn=lambda m, b: choice_loss(handle, b, "choice", model=m), progress=console is not None)
        curve = [{"step": c["step"], "s_amb": c["value"] * s_amb_organism, "share_of_organism": c["value"],
                  "loss": c["loss"]} for c in res["curve"]]
        out.append({"lr": lr, "seed": seed, "curve": curve, "steps_to_full_return": res["steps_to_return"]})
        del model
    return out


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    """`excise run recipes/bbq_study.yaml`."""
    cfg = validate(BBQStudyConfig, settings, source)
    if quick:
        cfg = cfg.model_copy(update={"per_category": 8, "names_per_category": 8, "truth_per_category": 2,
                                     "pairs_per_category": 4, "finetune_per_category": 4,
                                     "finetune": cfg.finetune.model_copy(update={"steps": min(cfg.finetune.steps, 3)}),
                                     "relearn": cfg.relearn.model_copy(update={"lrs": cfg.relearn.lrs[:1],
                                                                               "seeds": cfg.relearn.seeds[:1],
                                                                               "steps": 2, "eval_every": 1,
                                                                               "eval_per_category": 4})})
    s = run_study(cfg, out, force=force, console=console)
    if console is not None:
        console.print((Path(out) / "report" / "study.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    return s
