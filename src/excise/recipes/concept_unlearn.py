"""Concept unlearning with activation-guided masked LoRA: screen -> before -> localize -> unlearn -> after [-> compare].

Stages (each a resumable folder of the run directory):

* ``screen``: keep the spec items the base model leaks on / answers correctly; report counts.
* ``before``: knowledge measures of the base model (leak per family, answer probability,
  retain accuracy, neutral perplexity; n and 95% CIs).
* ``localize``: saliency / Fisher / activation scores at MLP neurons and heads, a mask, heatmaps.
* ``unlearn``: one masked-LoRA run (saved as a PEFT adapter + ``unit_mask.safetensors``), with the
  proof that units outside the mask and all base weights are unchanged.
* ``after``: the same measures on the unlearned model, and the before/after table.
* ``compare`` (``compare: true``): masked LoRA (saliency, Fisher, random masks of the same size)
  vs plain LoRA vs full fine-tuning at equal steps, each with a relearning check.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from excise.attack.relearn import RelearnConfig
from excise.errors import ExciseError
from excise.io import iter_jsonl
from excise.intervene.masked_lora import UnlearnSettings
from excise.intervene.trainable import LoraFields
from excise.locate.saliency import SaliencyConfig
from excise.select import SelectConfig

VARIANTS = ("masked_saliency", "masked_fisher", "masked_random", "plain_lora", "full_ft")


class CompareConfig(BaseModel):
    """The comparison: which variants, at equal steps, and the relearning check."""

    model_config = {"extra": "forbid"}
    variants: list[Literal["masked_saliency", "masked_fisher", "masked_random", "plain_lora", "full_ft"]] = Field(
        default_factory=lambda: list(VARIANTS), description="methods compared at the same steps and objective")
    full_lr: float = Field(2e-5, gt=0, description="learning rate of full fine-tuning (LoRA variants use unlearn.lr)")
    relearn: RelearnConfig = Field(default_factory=RelearnConfig, description="relearning check run on every variant")
    relearn_check: Literal["direct", "paraphrase"] = Field(
        "direct", description="probe family whose leak rate tells that the concept came back")


class ConceptUnlearnConfig(BaseModel):
    """Settings of the concept-unlearning workflow."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory or hub id")
    concept: str = Field("inception", description="concept spec: a YAML/JSON path or a packaged name")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    seed: int = Field(0, description="one seed for data order, LoRA init and random masks")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    max_new_tokens: int = Field(24, ge=1, description="greedy tokens generated per probe")
    units: Literal["neuron", "head"] = Field("neuron", description="unit kind the mask and the masked LoRA act on")
    localize: SaliencyConfig = Field(default_factory=SaliencyConfig, description="how units are scored")
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(method="topk", k=256, per_layer=False),
                                 description="how the mask is chosen from the scores")
    lora: LoraFields = Field(default_factory=LoraFields, description="adapter settings (peft LoraConfig fields)")
    unlearn: UnlearnSettings = Field(default_factory=UnlearnSettings, description="objective, steps, learning rate")
    compare: bool = Field(False, description="also run the comparison (masked vs plain LoRA vs full fine-tuning, mask sources, relearning)")
    comparison: CompareConfig = Field(default_factory=CompareConfig, description="settings of the comparison")


def _est_cell(m: dict | None, pct: bool = True) -> str:
    if not m or m.get("value") is None:
        return "undefined (n=0)"
    f = (lambda x: f"{100 * x:.0f}") if pct else (lambda x: f"{x:.3g}")
    lo, hi = m.get("lo"), m.get("hi")
    ci = f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else ""
    return f"{f(m['value'])}{ci} (n={m['n']})"


ROWS = [("leak.direct", "leak % direct", True), ("leak.paraphrase", "leak % paraphrase", True),
        ("leak.adversarial", "leak % adversarial (all families)", True),
        ("answer_logprob.direct", "answer log-prob direct", False), ("answer_prob.direct", "answer prob direct", False),
        ("retain_accuracy", "retain accuracy %", True), ("retain_accuracy.neighbour", "retain % neighbour films", True),
        ("retain_accuracy.unrelated", "retain % unrelated facts", True), ("neutral_perplexity", "neutral perplexity", False)]


def _family_rows(metrics: dict) -> list[tuple[str, str, bool]]:
    return [(k, f"leak % {k[len('leak.adv_'):]}", True) for k in sorted(metrics) if k.startswith("leak.adv_")]


def _table(columns: dict[str, dict], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown table: one row per measure, one column per model state."""
    first = next(iter(columns.values()))
    rows = ROWS[:3] + _family_rows(first) + ROWS[3:]
    names = list(columns)
    out = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, pct in rows:
        out.append(f"| {label} | " + " | ".join(_est_cell(columns[n].get(key), pct) for n in names) + " |")
    for label, cells in (extra or {}).items():
        out.append(f"| {label} | " + " | ".join(cells.get(n, "") for n in names) + " |")
    return "\n".join(out) + "\n"


def run_concept(cfg: ConceptUnlearnConfig, out: str | Path, *, force: bool = False, quick: bool = False,
                console: Any = None, stop_after: str | None = None) -> dict:
    """Run the workflow's stages in ``out`` (resumable); ``stop_after="localize"`` stops after localization."""
    import torch

    from excise.attack.probes import screen
    from excise.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json
    from excise.measure.unlearning import evaluate
    from excise.models import load
    from excise.run import Run, seed_everything
    from excise.tasks.concepts import ConceptSpec, load_concept

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = console.print if console is not None else (lambda *a, **k: None)
    spec_full = load_concept(cfg.concept)
    seed_everything(cfg.seed)
    # the comparison is an add-on stage: its settings are not part of the run's identity, so
    # `compare: true` on a finished default run resumes it and only adds the `compare` stage
    run = Run(out, {"workflow": "concept", "quick": quick, **cfg.model_dump(exclude={"compare", "comparison"})}, force=force)
    t_start = time.time()
    handle = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    say(f"[bold]concept[/] {spec_full.name} on {cfg.model} -> {run.dir}")
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
            spec = spec.model_copy(update={"forget": cut(spec.forget, 4), "paraphrases": cut(spec.paraphrases, 4),
                                           "adversarial": cut(spec.adversarial[::3], 6), "retain": cut(spec.retain[::3], 8),
                                           "neutral": cut(spec.neutral, 4)})
        filtered, report, before = screen(handle, spec, max_new_tokens=cfg.max_new_tokens)
        atomic_write_json(d / "spec_kept.json", filtered.model_dump())
        atomic_write_json(d / "base_generations.json", before)
        atomic_write_jsonl(d / "items.jsonl", report.pop("items"))
        atomic_write_json(d / "kept.json", report)
        return {k: v for k, v in report.items() if isinstance(v, dict) and "kept" in v}

    timed("screen", st_screen)
    spec = ConceptSpec.model_validate(read_json(run.stage_dir("screen") / "spec_kept.json"))
    base_gens = read_json(run.stage_dir("screen") / "base_generations.json")
    mnt = cfg.max_new_tokens

    # --- before ---------------------------------------------------------------------------
    def st_before(d: Path) -> dict:
        ev = evaluate(handle, spec, max_new_tokens=mnt, seed=cfg.seed, generations=base_gens)
        atomic_write_jsonl(d / "items.jsonl", ev["items"])
        return ev["metrics"]

    before = timed("before", st_before).metrics

    # --- localize -------------------------------------------------------------------------
    def st_localize(d: Path) -> dict:
        from excise.locate.saliency import score_units
        from excise.report.plots import heatmap
        from excise.select import select

        info = {}
        methods = [cfg.localize.method]
        if cfg.compare:
            methods = list(dict.fromkeys(methods + [m.split("_", 1)[1] for m in cfg.comparison.variants
                                                    if m in ("masked_saliency", "masked_fisher")]))
        for method in methods:
            t0 = time.time()
            sc = score_units(handle, spec.forget, spec.retain, cfg.localize.model_copy(update={"method": method}))
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
        from excise.select import Mask

        f = loc_dir / f"mask_{method}.pt"
        if not f.exists():  # a comparison added to a finished default run: score with the other localizer now
            f = run.dir / "compare_masks" / f"mask_{method}.pt"
            if not f.exists():
                from excise.io import atomic_write_bytes
                from excise.locate.saliency import score_units
                from excise.select import select

                sc = score_units(handle, spec.forget, spec.retain, cfg.localize.model_copy(update={"method": method}))
                import io as _io

                buf = _io.BytesIO()
                torch.save(select(sc[cfg.units], cfg.select).values, buf)
                atomic_write_bytes(f, buf.getvalue())
        return Mask(cfg.units, torch.load(f, weights_only=True))

    base_model = handle.model

    def train_variant(variant: str, d: Path | None) -> tuple[Any, dict]:
        """Fresh copy of the base model, intervention, equal steps; returns (model, info)."""
        from excise.intervene.masked_lora import all_units, unlearn_concept
        from excise.intervene.trainable import make_trainable
        from excise.locate.saliency import random_mask_like

        seed_everything(cfg.seed)
        model = copy.deepcopy(base_model)
        base_sd = {k: v.clone() for k, v in model.state_dict().items()}
        ucfg = cfg.unlearn
        if variant.startswith("masked_"):
            src = variant.split("_", 1)[1]
            mask = random_mask_like(mask_for(cfg.localize.method), seed=cfg.seed) if src == "random" else mask_for(src)
            tr = make_trainable(model, "masked_lora", cfg.lora, mask=mask, seed=cfg.seed)
        elif variant == "plain_lora":
            tr = make_trainable(model, "masked_lora", cfg.lora, mask=all_units(model, cfg.units), seed=cfg.seed)
        else:
            ucfg = ucfg.model_copy(update={"lr": cfg.comparison.full_lr})
            tr = make_trainable(model, "full")
        ml = tr.masked
        n_trainable = tr.n_trainable
        n_effective = ml.n_effective if ml else n_trainable
        t0 = time.time()
        vh = copy.copy(handle)
        vh.model = model
        log = unlearn_concept(vh, tr.model, spec, ucfg)
        train_s = time.time() - t0
        info: dict[str, Any] = {"variant": variant, "train_seconds": round(train_s, 1), "n_trainable": n_trainable,
                                "n_effective": n_effective, "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
                                "steps": len(log)}
        if ml is not None:
            info["delta_outside_mask"] = ml.delta_outside_mask()
            info["units_selected"] = ml.mask.n_selected
            base_now = ml.model.get_base_model().state_dict()
            changed = [k for k, v in base_now.items() if "lora_" not in k
                       and not torch.equal(v, base_sd[k.replace(".base_layer", "")])]
            info["base_params_changed"] = len(changed)
            if d is not None:
                ml.save(d / "adapter")
        if d is not None:
            atomic_write_jsonl(d / "train_log.jsonl", log)
        return (ml.model if ml else model), info

    # --- unlearn + after ------------------------------------------------------------------
    variant0 = f"masked_{cfg.localize.method}"
    state: dict[str, Any] = {}

    def st_unlearn(d: Path) -> dict:
        import copy as _c

        model, info = train_variant(variant0, d)
        state["model"] = model
        vh = _c.copy(handle)
        vh.model = model
        t0 = time.time()
        ev = evaluate(vh, spec, max_new_tokens=mnt, seed=cfg.seed)
        info["eval_seconds"] = round(time.time() - t0, 1)
        atomic_write_jsonl(d / "items.jsonl", ev["items"])
        atomic_write_json(d / "after_metrics.json", ev["metrics"])
        atomic_write_json(d / "info.json", info)
        return info

    un = timed("unlearn", st_unlearn)
    after = read_json(un.dir / "after_metrics.json")
    info0 = read_json(un.dir / "info.json")

    def st_report(d: Path) -> dict:
        kept = read_json(run.stage_dir("screen") / "kept.json")
        kept_line = ", ".join(f"{k} {v['kept']}/{v['candidates']}" for k, v in kept.items() if isinstance(v, dict) and "kept" in v)
        extra = {"trainable parameters": {"base": "-", variant0: f"{info0['n_trainable']:,} ({info0['n_effective']:,} free)"},
                 "max abs dW outside mask": {"base": "-", variant0: f"{info0.get('delta_outside_mask')}"},
                 "base params changed": {"base": "-", variant0: str(info0.get("base_params_changed"))},
                 "train time (s)": {"base": "-", variant0: str(info0["train_seconds"])}}
        md = (f"# {spec.name}: before / after ({variant0}, {cfg.unlearn.objective}, {cfg.unlearn.steps} steps)\n\n"
              f"Items kept after screening the base model: {kept_line}.\n\n" + _table({"base": before, variant0: after}, extra))
        atomic_write_text(d / "before_after.md", md)
        rows = []
        for key in sorted(set(before) | set(after)):
            b, a = before.get(key) or {}, after.get(key) or {}
            rows.append({"measure": key, **{f"before_{k}": b.get(k) for k in ("value", "lo", "hi", "n")},
                         **{f"after_{k}": a.get(k) for k in ("value", "lo", "hi", "n")}})
        from excise.run import write_metrics

        write_metrics(d, rows, name="before_after")
        targets = _targets(before, after)
        atomic_write_json(d / "targets.json", targets)
        return {"targets": targets, "seconds": timings}

    rep = timed("report", st_report)
    result = {"dir": str(run.dir), "before": before, "after": after, "info": info0,
              "targets": rep.metrics.get("targets") if rep.metrics else None}

    # --- comparison -----------------------------------------------------------------------
    if cfg.compare:
        def st_compare(d: Path) -> dict:
            from excise.attack.relearn import relearn
            from excise.measure.unlearning import generate
            from excise.report.plots import heatmap
            from excise.tasks.concepts import encode_items

            cols: dict[str, dict] = {"base": before}
            extra: dict[str, dict[str, str]] = {"trainable parameters": {"base": "-"}, "train time (s)": {"base": "-"},
                                                "relearn steps to return": {}, "max abs dW outside mask": {"base": "-"}}
            curves: dict[str, list] = {}
            summary = {}
            check_items = spec.forget if cfg.comparison.relearn_check == "direct" else spec.paraphrases
            rl_batches = [encode_items(handle, list(spec.forget[s:s + cfg.unlearn.batch_size]))
                          for s in range(0, len(spec.forget), cfg.unlearn.batch_size)]

            def make_check(vh):
                def check(m):
                    gens = generate(vh, check_items, max_new_tokens=min(mnt, 16), model=m)
                    return sum(spec.leaks(it, g) for it, g in zip(check_items, gens)) / max(len(check_items), 1)
                return check

            # the base model's relearning baseline is its own leak rate
            for variant in cfg.comparison.variants:
                vd = d / variant
                vd.mkdir(parents=True, exist_ok=True)
                if variant == variant0:  # the default run already trained it: reload its adapter, reuse its measures
                    from excise.intervene.masked_lora import load_masked_lora

                    model = load_masked_lora(copy.deepcopy(base_model), un.dir / "adapter").model
                    info = dict(info0)
                    vh = copy.copy(handle)
                    vh.model = model
                    ev = {"metrics": after, "items": [row for _, row in iter_jsonl(un.dir / "items.jsonl")]}
                else:
                    say(f"    {variant}: training")
                    model, info = train_variant(variant, None)
                    vh = copy.copy(handle)
                    vh.model = model
                    t0 = time.time()
                    ev = evaluate(vh, spec, max_new_tokens=mnt, seed=cfg.seed)
                    info["eval_seconds"] = round(time.time() - t0, 1)
                atomic_write_jsonl(vd / "items.jsonl", ev["items"])
                cols[variant] = ev["metrics"]
                # relearning: the attacker fine-tunes all weights of the (merged) model on the forget facts
                plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
                t0 = time.time()
                rl = relearn(plain, rl_batches, make_check(vh), cfg.comparison.relearn)
                info["relearn_seconds"] = round(time.time() - t0, 1)
                info["relearn"] = rl
                curves[variant] = [(c["step"], c["value"]) for c in rl["curve"]]
                extra["trainable parameters"][variant] = f"{info['n_trainable']:,}"
                extra["train time (s)"][variant] = str(info["train_seconds"])
                extra["max abs dW outside mask"][variant] = str(info.get("delta_outside_mask", "-"))
                s2r = rl["steps_to_return"]
                extra["relearn steps to return"][variant] = str(s2r) if s2r is not None else f"> {rl['max_steps']}"
                atomic_write_json(vd / "info.json", info)
                summary[variant] = {"metrics": ev["metrics"], "info": info}
                del model, plain, vh
                say(f"    {variant}: done (train {info['train_seconds']} s, eval {info.get('eval_seconds')} s, "
                    f"relearn {info['relearn_seconds']} s)")
            extra["relearn steps to return"]["base"] = "0 (knows it)"
            md = (f"# {spec.name}: comparison at equal steps ({cfg.unlearn.objective}, {cfg.unlearn.steps} steps, "
                  f"{cfg.units} masks of {mask_for(cfg.localize.method).n_selected} units)\n\n" + _table(cols, extra)
                  + f"\nRelearning: full fine-tuning (lr {cfg.comparison.relearn.lr}) on the forget facts; the concept "
                    f"is back when the {cfg.comparison.relearn_check} leak rate reaches {cfg.comparison.relearn.threshold}.\n")
            atomic_write_text(d / "comparison.md", md)
            rows = []
            for v, mets in cols.items():
                for k, e in mets.items():
                    rows.append({"variant": v, "measure": k, **(e or {})})
            from excise.run import write_metrics

            write_metrics(d, rows, name="comparison")
            from excise.report.plots import lines

            lines({k: ([x for x, _ in pts], [y for _, y in pts]) for k, pts in curves.items()}, d / "relearning.png",
                  title=f"relearning {spec.name}: {cfg.comparison.relearn_check} leak rate",
                  xlabel="fine-tuning steps on the forget facts", ylabel="leak rate",
                  hline=cfg.comparison.relearn.threshold)
            keys = ["leak.direct", "leak.paraphrase", "leak.adversarial", "retain_accuracy"]
            import numpy as np

            mat = np.array([[(cols[v].get(k) or {}).get("value") or np.nan for k in keys] for v in cols], dtype=float)
            heatmap(mat, d / "comparison.png", title="leak and retain rates by method", xlabel="measure", ylabel="method",
                    xticklabels=keys, yticklabels=list(cols), annotate=True, cmap="viridis")
            return {v: {"leak_direct": s["metrics"]["leak.direct"]["value"],
                        "leak_paraphrase": (s["metrics"].get("leak.paraphrase") or {}).get("value"),
                        "retain_accuracy": s["metrics"]["retain_accuracy"]["value"],
                        "steps_to_return": s["info"]["relearn"]["steps_to_return"],
                        "train_seconds": s["info"]["train_seconds"]} for v, s in summary.items()}

        cmp_dir = run.stage_dir("compare")
        if run.is_done("compare"):
            prev = read_json(cmp_dir / "comparison_settings.json")
            if prev != json.loads(cfg.comparison.model_dump_json()):
                if not force:
                    raise ExciseError(f"{cmp_dir} holds a comparison with other settings; pass --force or choose another --out")
                import shutil

                shutil.rmtree(cmp_dir)

        def st_compare_(d: Path) -> dict:
            atomic_write_json(d / "comparison_settings.json", json.loads(cfg.comparison.model_dump_json()))
            return st_compare(d)

        cmp_ = timed("compare", st_compare_)
        result["compare"] = cmp_.metrics
    timings["total"] = round(time.time() - t_start, 1)
    atomic_write_json(run.dir / "timings.json", timings)
    result["seconds"] = timings
    say(f"done in {timings['total']} s: {run.dir}")
    return result


def _targets(before: dict, after: dict) -> dict:
    """The issue's targets, measured: leak <= 10% direct/paraphrase, retain -5 pts, perplexity +10%."""
    def v(m, k):
        return (m.get(k) or {}).get("value")

    out = {}
    for fam in ("direct", "paraphrase"):
        a = v(after, f"leak.{fam}")
        out[f"leak_{fam}_le_10pct"] = {"value": a, "met": a is not None and a <= 0.10}
    rb, ra = v(before, "retain_accuracy"), v(after, "retain_accuracy")
    drop = None if rb is None or ra is None else 100 * (rb - ra)
    out["retain_drop_le_5pts"] = {"value": drop, "met": drop is not None and drop <= 5}
    pb, pa = v(before, "neutral_perplexity"), v(after, "neutral_perplexity")
    rise = None if not pb or pa is None else 100 * (pa / pb - 1)
    out["perplexity_rise_le_10pct"] = {"value": rise, "met": rise is not None and rise <= 10}
    out["adversarial_leak"] = {"value": v(after, "leak.adversarial"), "met": None}
    return out


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    from excise.config import validate

    cfg = validate(ConceptUnlearnConfig, settings, source)
    if quick:
        cfg = cfg.model_copy(update={"unlearn": cfg.unlearn.model_copy(update={"steps": min(cfg.unlearn.steps, 4)}),
                                     "max_new_tokens": min(cfg.max_new_tokens, 16)})
        if cfg.compare:
            cfg = cfg.model_copy(update={"comparison": cfg.comparison.model_copy(update={
                "relearn": cfg.comparison.relearn.model_copy(update={"steps": 2, "eval_every": 1})})})
    return run_concept(cfg, out, force=force, quick=quick, console=console)
