"""The concept workflow's unlearning variants, and the ``compare`` stage that runs them at equal steps.

A variant names a training method and, optionally, another objective:

* ``masked_saliency`` / ``masked_fisher``: masked LoRA on the units that localizer selects;
* ``masked_random``: masked LoRA on random units, as many per layer as the saliency mask (the
  baseline that says whether localization found units that matter);
* ``plain_lora``: LoRA on every unit; ``full_ft``: every weight (at ``comparison.full_lr``);
* ``method@objective`` (e.g. ``plain_lora@idk``): that method with objective ``grad_ascent``,
  ``idk`` or ``npo`` instead of ``unlearn.objective``, at the same steps and learning rate.

Why one module: the default run's ``unlearn`` stage, the comparison and the tuning script
(``benchmarks/concept_tune.py``) train a variant the same way, through :func:`train_variant`.

The comparison keeps every finished variant in its checkpoint area (:class:`excise.resume.Points`),
so a killed comparison resumes at the variant it was in; and a finished comparison whose variant
list grows (its other settings equal) keeps the variants it measured and runs only the new ones.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch

from excise.attack.relearn import relearn
from excise.intervene.masked_lora import all_units, unlearn_concept
from excise.intervene.trainable import make_trainable
from excise.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, iter_jsonl, read_json
from excise.locate import mask_ablation
from excise.locate.saliency import random_mask_like
from excise.measure.frame import GroupedResult
from excise.measure.unlearning import evaluate, generate
from excise.recipes.concept_config import parse_variant  # names checked where the settings are validated
from excise.recipes.concept_knowledge import tofu, write_tofu
from excise.recipes.concept_report import write_comparison
from excise.recipes.concept_splits import relearn_sets
from excise.resume import Points, link_tree
from excise.run import seed_everything
from excise.select import Mask
from excise.tasks.concepts import encode_items


def localizers(cfg: Any) -> list[str]:
    """The localizers a run needs: its own, then those of its ``masked_saliency`` / ``masked_fisher`` variants
    (with any objective) when it compares."""
    named = [parse_variant(v)[0] for v in cfg.comparison.variants] if cfg.compare else []
    return list(dict.fromkeys([cfg.localize.method] + [m.split("_", 1)[1] for m in named
                                                       if m in ("masked_saliency", "masked_fisher")]))


def train_variant(handle: Any, base_model: Any, spec: Any, cfg: Any, variant: str, mask_for: Callable[[str], Mask],
                  *, checkpoint_dir: Path | None = None, adapter_dir: Path | None = None,
                  log_path: Path | None = None) -> tuple[Any, dict]:
    """A fresh copy of ``base_model`` unlearned as ``variant`` says (``cfg.unlearn``'s steps); (model, info).

    ``mask_for(localizer)`` gives a localizer's mask. The info holds the training time, trainable and
    effective parameter counts, and for masked variants the proof that nothing outside the mask moved."""
    method, objective = parse_variant(variant)
    seed_everything(cfg.seed)
    model = copy.deepcopy(base_model)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ucfg = cfg.unlearn if objective is None else cfg.unlearn.model_copy(update={"objective": objective})
    if method.startswith("masked_"):
        src = method.split("_", 1)[1]
        mask = random_mask_like(mask_for(cfg.localize.method), seed=cfg.seed) if src == "random" else mask_for(src)
        tr = make_trainable(model, "masked_lora", cfg.lora, mask=mask, seed=cfg.seed)
    elif method == "plain_lora":
        tr = make_trainable(model, "masked_lora", cfg.lora, mask=all_units(model, cfg.units), seed=cfg.seed)
    else:
        ucfg = ucfg.model_copy(update={"lr": cfg.comparison.full_lr})
        tr = make_trainable(model, "full")
    ml = tr.masked
    t0 = time.time()
    log = unlearn_concept(handle.with_model(model), tr.model, spec, ucfg,
                          checkpoint_dir=checkpoint_dir if ucfg.checkpoint_every else None)
    info: dict[str, Any] = {"variant": variant, "objective": ucfg.objective, "lr": ucfg.lr,
                            "train_seconds": round(time.time() - t0, 1), "n_trainable": tr.n_trainable,
                            "n_effective": ml.n_effective if ml else tr.n_trainable, "first_loss": log[0]["loss"],
                            "last_loss": log[-1]["loss"], "steps": len(log)}
    if ml is not None:
        info["delta_outside_mask"] = ml.delta_outside_mask()
        info["units_selected"] = ml.mask.n_selected
        base_now = ml.model.get_base_model().state_dict()
        info["base_params_changed"] = len([k for k, v in base_now.items() if "lora_" not in k
                                           and not torch.equal(v, base_sd[k.replace(".base_layer", "")])])
        if adapter_dir is not None:
            ml.save(adapter_dir)
    if log_path is not None:
        atomic_write_jsonl(log_path, log)
    return (ml.model if ml else model), info


def adopt_finished(old_dir: Path, variants: list[str], points: Points) -> list[str]:
    """Keep the variants an earlier finished comparison measured (its other settings equal) as finished points.

    Reads the per-variant folder (``info.json``, ``items.jsonl``), the leak and retain measures
    (``comparison.json``) and the TOFU result (``tofu_<variant>.json``). Returns the variants kept."""
    rows = read_json(old_dir / "comparison.json") if (old_dir / "comparison.json").exists() else []
    kept = []
    for v in variants:
        vd = old_dir / v
        if points.get(v) is not None or not (vd / "info.json").exists() or not (vd / "items.jsonl").exists():
            continue
        metrics = {r["measure"]: ({k: x for k, x in r.items() if k not in ("variant", "measure")} if "value" in r else None)
                   for r in rows if r.get("variant") == v}
        if not metrics:
            continue
        tofu_file = old_dir / f"tofu_{v}.json"
        points.folder(v, lambda t, vd=vd: link_tree(vd, t / "files"))
        points.put(v, {"info": read_json(vd / "info.json"), "metrics": metrics,
                       "tofu": read_json(tofu_file) if tofu_file.exists() else None})
        kept.append(v)
    return kept


def run_comparison(d: Path, *, cfg: Any, handle: Any, base_model: Any, spec: Any, org: Any, unscreened: list,
                   before: dict, variant0: str, after: dict, info0: dict, unlearn_dir: Path,
                   unlearned_model: Callable[[], Any], mask_for: Callable[[str], Mask], points: Points,
                   tofu_dir: Path | None, say: Callable[..., None]) -> dict:
    """The ``compare`` stage: every variant trained, measured (leak, retain, TOFU) and attacked by relearning."""
    mnt = cfg.max_new_tokens
    rl_train, check_items = relearn_sets(spec, cfg.comparison.relearn_check)
    rl_batches = [encode_items(handle, rl_train[s:s + cfg.unlearn.batch_size])
                  for s in range(0, len(rl_train), cfg.unlearn.batch_size)]

    def make_check(vh):
        def check(m):
            gens = generate(vh, check_items, max_new_tokens=min(mnt, 16), model=m)
            return sum(spec.leaks(it, g) for it, g in zip(check_items, gens)) / max(len(check_items), 1)
        return check

    def measure(variant: str) -> dict:
        if variant == variant0:  # the default run already trained it: reload its adapter, reuse its measures
            model, info = unlearned_model(), dict(info0)
            ev = {"metrics": after, "items": [row for _, row in iter_jsonl(unlearn_dir / "items.jsonl")]}
        else:
            say(f"    {variant}: training")
            model, info = train_variant(handle, base_model, spec, cfg, variant, mask_for)
            t0 = time.time()
            ev = evaluate(handle.with_model(model), spec, max_new_tokens=mnt, seed=cfg.seed, retain_unscreened=unscreened)
            info["eval_seconds"] = round(time.time() - t0, 1)
        t0 = time.time()
        res = tofu(handle, org, model=model).as_dict() if org is not None else None  # before the attack trains it
        info["tofu_seconds"] = round(time.time() - t0, 1)
        # relearning: the attacker fine-tunes all weights of the (merged) model on the training forget facts
        plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        t0 = time.time()
        info["relearn"] = relearn(plain, rl_batches, make_check(handle.with_model(plain)), cfg.comparison.relearn)
        info["relearn_seconds"] = round(time.time() - t0, 1)
        points.folder(variant, lambda t: atomic_write_jsonl(t / "files" / "items.jsonl", ev["items"]))
        say(f"    {variant}: done (train {info.get('train_seconds')} s, eval {info.get('eval_seconds')} s, "
            f"TOFU {info['tofu_seconds']} s, relearn {info['relearn_seconds']} s)")
        return {"info": info, "metrics": ev["metrics"], "tofu": res}

    # localization, measured: ablating each localizer's units vs random units of equal count, on held-out items
    used = localizers(cfg)
    loc = points.cached(f"localization-{'+'.join(used)}", lambda: mask_ablation.score_masks(
        handle, {m: mask_for(m) for m in used}, {"forget_heldout": spec.forget_eval, "retain": unscreened},
        seed=cfg.seed))
    atomic_write_json(d / "localization.json", loc)
    atomic_write_text(d / "localization.md", "# Do the localized units matter? (ablated on held-out items)\n\n"
                      + mask_ablation.markdown(loc))

    cols: dict[str, dict] = {"base": before}
    extra: dict[str, dict[str, str]] = {"objective": {"base": "-"}, "trainable parameters": {"base": "-"},
                                        "train time (s)": {"base": "-"}, "relearn steps to return": {},
                                        "relearn: leak at the end": {}, "relearn lr (worst case)": {"base": "-"},
                                        "max abs dW outside mask": {"base": "-"}}
    curves: dict[str, list] = {}
    summary: dict[str, dict] = {}
    for variant in cfg.comparison.variants:
        rec = points.get(variant)
        if rec is None or not points.folder_path(variant).is_dir():
            rec = points.put(variant, measure(variant))
        else:
            say(f"    {variant}: resumed")
        vd = d / variant
        link_tree(points.folder_path(variant) / "files", vd)
        info, rl = rec["info"], rec["info"]["relearn"]
        atomic_write_json(vd / "info.json", info)
        cols[variant] = rec["metrics"]
        curves[variant] = [(c["step"], c["value"]) for c in rl["curve"]]
        extra["objective"][variant] = info.get("objective", cfg.unlearn.objective)
        extra["trainable parameters"][variant] = f"{info['n_trainable']:,}"
        extra["train time (s)"][variant] = str(info["train_seconds"])
        extra["max abs dW outside mask"][variant] = str(info.get("delta_outside_mask", "-"))
        s2r = rl["steps_to_return"]
        extra["relearn steps to return"][variant] = str(s2r) if s2r is not None else f"> {rl['max_steps']}"
        extra["relearn: leak at the end"][variant] = f"{100 * rl['curve'][-1]['value']:.0f}% (step {rl['curve'][-1]['step']})"
        extra["relearn lr (worst case)"][variant] = f"{rl['lr']:g}"
        summary[variant] = rec
    extra["relearn steps to return"]["base"] = "0 (knows it)"
    extra["relearn: leak at the end"]["base"] = "-"
    if org is not None and tofu_dir is not None:
        ref = {n: GroupedResult.from_dict(read_json(tofu_dir / f"tofu_{n}.json")) for n in ("organism", "oracle")}
        head = write_tofu(d, {"organism": ref["organism"],
                              **{v: GroupedResult.from_dict(s["tofu"]) for v, s in summary.items() if s.get("tofu")},
                              "oracle": ref["oracle"]},
                          f"TOFU metrics at equal steps ({cfg.unlearn.steps} steps; objective per variant: "
                          f"{cfg.unlearn.objective} unless named after '@')")
        for v in summary:
            if v in head:
                summary[v]["tofu_head"] = head[v]
    write_comparison(d, cfg, spec.name, mask_for(cfg.localize.method).n_selected, cols, extra, curves,
                     n_train=len(rl_train), n_check=len(check_items))
    return {v: {"leak_direct": s["metrics"]["leak.direct"]["value"],
                "leak_paraphrase": (s["metrics"].get("leak.paraphrase") or {}).get("value"),
                "retain_accuracy": s["metrics"]["retain_accuracy"]["value"],
                "retain_accuracy_unscreened": s["metrics"]["retain_accuracy_unscreened"]["value"],
                "steps_to_return": s["info"]["relearn"]["steps_to_return"],
                "train_seconds": s["info"]["train_seconds"], **({"tofu": s["tofu_head"]} if "tofu_head" in s else {})}
            for v, s in summary.items()}


__all__ = ["adopt_finished", "localizers", "run_comparison", "train_variant"]
