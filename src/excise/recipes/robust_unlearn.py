"""Workflow `undo`: robust unlearning on arithmetic — baselines, UNDO, targeted UNDO, relearning.

Stages of a run directory (each atomic and resumable):

* ``models``: pretrain (or reuse from the cache) the base model on + - * / and the oracle on
  + - only; their accuracy per operation.
* ``seed{s}-unlearn``: every unlearning method applied to the base (GradAscent, GradDiff,
  MaxEnt, NPO, RMU); saved models and forget / retain accuracy.
* ``seed{s}-undo``: the teacher (``undo_from`` method's model) noised globally at each alpha
  and with each targeted mask (parameter difference, SNMF, Fisher), then distilled back;
  steps, tokens and estimated FLOPs of distillation.
* ``seed{s}-relearn``: the relearning attack (learning-rate sweep) on every model, including
  oracle and base.
* ``report``: per model, mean over seeds with 95% CIs of forget / retain accuracy,
  distillation compute and relearning robustness; ``comparison.csv``, ``comparison.md`` and
  ``tradeoff.png`` (distillation compute vs relearning robustness).

``quick`` runs one seed, fewer variants and shorter loops (the smoke test of the workflow).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from excise.attack.relearn_arithmetic import RelearnConfig
from excise.intervene.undo import DistillConfig
from excise.intervene.unlearn_methods import METHODS, UnlearnConfig
from excise.locate.snmf import SNMFConfig
from excise.organisms.arithmetic import PretrainConfig


def _default_methods() -> dict[str, UnlearnConfig]:
    # Step counts / learning rates tuned once on the default 2-layer base (docs/undo.md); answer tokens only.
    return {
        "grad_ascent": UnlearnConfig(method="grad_ascent", steps=20, lr=2e-4, loss_on="answer"),
        "grad_diff": UnlearnConfig(method="grad_diff", steps=40, lr=3e-4, loss_on="answer"),
        "maxent": UnlearnConfig(method="maxent", steps=60, lr=5e-4, loss_on="answer"),
        "npo": UnlearnConfig(method="npo", steps=60, lr=5e-4, loss_on="answer"),
        "rmu": UnlearnConfig(method="rmu", steps=80, lr=5e-3, rmu_layer=0, loss_on="answer"),
    }


class TargetedConfig(BaseModel):
    """One targeted-noise variant of UNDO."""

    model_config = {"extra": "forbid"}
    localizer: Literal["paramdiff", "snmf", "fisher"] = Field(..., description="where the mask comes from")
    alpha: float = Field(0.8, ge=0, le=1, description="noise strength inside the mask")
    top_p: float = Field(0.1, gt=0, le=1, description="fraction of each tensor (paramdiff, fisher) or of each layer's neurons (snmf) masked")
    mode: Literal["binary", "relative"] = Field("binary", description="paramdiff/fisher mask: top-p binary, or score / max (relative)")

    @property
    def name(self) -> str:
        extra = f"-{self.mode}" if self.localizer != "snmf" else ""
        return f"undo-{self.localizer}{extra}-a{self.alpha:g}"


class RobustUnlearnConfig(BaseModel):
    """Settings of the robust-unlearning comparison (`excise run recipes/robust_unlearn.yaml`)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str | None = Field(None, description="a Hugging Face decoder (directory or hub id) instead of the pretrained base; no oracle then")
    forget_file: str | None = Field(None, description="JSONL forget items {prompt, answer, op} (default: the packaged mul/div generator)")
    retain_file: str | None = Field(None, description="JSONL retain items (default: the packaged add/sub generator)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="base-model pretraining (the oracle drops mul and div)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="seeds of unlearning, noise, distillation and attacks")
    methods: dict[str, UnlearnConfig] = Field(default_factory=_default_methods, description="unlearning methods to compare, by name")
    undo_from: str = Field("maxent", description="which unlearned model UNDO noises and distils from (the paper uses MaxEnt)")
    alphas: list[float] = Field(default_factory=lambda: [0.2, 0.5, 0.8], description="global-noise strengths of UNDO")
    beta: float = Field(0.1, ge=0, description="scale of the Xavier noise")
    targeted: list[TargetedConfig] = Field(
        default_factory=lambda: [TargetedConfig(localizer="paramdiff"), TargetedConfig(localizer="snmf"),
                                 TargetedConfig(localizer="fisher")],
        description="targeted-noise variants")
    snmf: SNMFConfig = Field(default_factory=SNMFConfig, description="SNMF localizer settings")
    localize_n: int = Field(256, ge=8, description="forget (and retain) items used by the localizers")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="distillation settings")
    relearn: RelearnConfig = Field(default_factory=RelearnConfig, description="relearning attack settings")
    eval_n_per_op: int = Field(100, ge=1, description="held-out items per operation for forget / retain accuracy")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")


QUICK = {
    "seeds": lambda c: c.seeds[:1],
    "alphas": lambda c: [0.5] if 0.5 in c.alphas or not c.alphas else c.alphas[:1],
    "eval_n_per_op": lambda c: min(c.eval_n_per_op, 50),
    "localize_n": lambda c: min(c.localize_n, 128),
}


def quick_variant(cfg: RobustUnlearnConfig) -> RobustUnlearnConfig:
    """One seed, one global alpha, shorter distillation and attacks."""
    upd = {k: f(cfg) for k, f in QUICK.items()}
    upd["distill"] = cfg.distill.model_copy(update={"max_steps": min(cfg.distill.max_steps, 100),
                                                    "eval_n_per_op": min(cfg.distill.eval_n_per_op, 30)})
    upd["relearn"] = cfg.relearn.model_copy(update={"lrs": cfg.relearn.lrs[-1:], "steps": min(cfg.relearn.steps, 30), "eval_every": min(cfg.relearn.eval_every, 10),
                                                    "eval_n_per_op": min(cfg.relearn.eval_n_per_op, 30)})
    return cfg.model_copy(update=upd)


# --- helpers ------------------------------------------------------------------------------

def evaluate(model: Any, tokenizer: Any, items: list) -> dict:
    from excise.measure.arithmetic import accuracy_by_op

    return {k: v.as_dict() for k, v in accuracy_by_op(model, tokenizer, items).items()}


class Data:
    """Forget / retain item sources: the packaged generator, or a user's JSONL files."""

    def __init__(self, cfg: RobustUnlearnConfig):
        from excise.tasks.arithmetic import FORGET_OPS, RETAIN_OPS, load_items

        self.files = bool(cfg.forget_file or cfg.retain_file)
        if self.files:
            if not (cfg.forget_file and cfg.retain_file):
                from excise.errors import ExciseError

                raise ExciseError("give both forget_file and retain_file (or neither)", where="config:forget_file")
            f = load_items(cfg.forget_file)
            r = load_items(cfg.retain_file)
            # relabel so the forget/retain groups are what the files say
            from excise.tasks.arithmetic import Item

            f = [Item(it.prompt, it.answer, it.op if it.op in FORGET_OPS else "mul", it.kind) for it in f]
            r = [Item(it.prompt, it.answer, it.op if it.op in RETAIN_OPS else "add", it.kind) for it in r]
            self.f_train, self.f_eval = _split(f)
            self.r_train, self.r_eval = _split(r)
        self.cfg = cfg

    def stream(self, group: str, seed: int):
        from excise.intervene.unlearn_methods import cycle
        from excise.tasks.arithmetic import FORGET_OPS, OPS, RETAIN_OPS, train_stream

        if self.files:
            pool = {"forget": self.f_train, "retain": self.r_train, "mixed": self.f_train + self.r_train}[group]
            return cycle(pool, seed)
        return train_stream({"forget": FORGET_OPS, "retain": RETAIN_OPS, "mixed": OPS}[group], seed)

    def train(self, group: str, n: int, seed: int) -> list:
        s = self.stream(group, seed)
        return [next(s) for _ in range(n)]

    def eval(self, n_per_op: int, seed: int = 0, ops: tuple[str, ...] | None = None) -> list:
        from excise.tasks.arithmetic import OPS, eval_items

        if self.files:
            items = self.f_eval + self.r_eval
            return [it for it in items if ops is None or it.op in ops]
        return eval_items(ops or OPS, n_per_op, seed=seed)


def _split(items: list) -> tuple[list, list]:
    from excise.tasks.arithmetic import is_eval_string

    ev = [it for it in items if is_eval_string(it.prompt)]
    tr = [it for it in items if not is_eval_string(it.prompt)]
    if not ev or not tr:  # tiny files: hold out every fifth item
        ev, tr = items[::5], [it for i, it in enumerate(items) if i % 5]
    return tr, ev


def _save(model: Any, tokenizer: Any, d: Path) -> None:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tiny model is noise
    try:
        model.save_pretrained(d, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(d)


def _load(path: Path) -> Any:
    from excise.organisms.arithmetic import load_model

    return load_model(path)


# --- the workflow -------------------------------------------------------------------------

def run_robust_unlearn(cfg: RobustUnlearnConfig, out: str | Path, *, force: bool = False, console: Any = None,
                       quick: bool = False) -> dict:
    import copy

    import torch

    from excise.run import Run, seed_everything

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.undo_from not in cfg.methods:
        from excise.errors import ExciseError

        raise ExciseError(f"undo_from '{cfg.undo_from}' is not one of the methods ({', '.join(cfg.methods)})",
                          where="config:undo_from")
    run = Run(out, {"workflow": "undo", "quick": quick, **cfg.model_dump(mode="json")}, force=force)
    data = Data(cfg)
    t_start = time.time()

    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[{time.time() - t_start:6.0f}s] {msg}")

    # -- models
    def stage_models(d: Path) -> dict:
        from excise.tasks.arithmetic import RETAIN_OPS
        from excise.organisms.arithmetic import load_model, pretrain

        out_ = {}
        if cfg.model:
            h = load_model(cfg.model)
            out_["base"] = {"path": str(cfg.model), "accuracy": evaluate(h.model, h.tokenizer, data.eval(cfg.eval_n_per_op))}
            return out_
        for name, pc in (("base", cfg.pretrain),
                         ("oracle", cfg.pretrain.model_copy(update={"ops": list(RETAIN_OPS)}))):
            say(f"pretraining {name} (cached after the first time)")
            p = pretrain(pc, name=name, progress=console is not None)
            h = load_model(p)
            from excise.io import read_json

            info = read_json(p / "pretrain.json")
            out_[name] = {"path": str(p), "pretrain_seconds": info["seconds"], "tokens_seen": info["tokens_seen"],
                          "n_params": info["n_params"],
                          "accuracy": evaluate(h.model, h.tokenizer, data.eval(cfg.eval_n_per_op))}
        return out_

    models = run.stage("models", stage_models).metrics
    say(f"base accuracy: { {k: round(v['value'], 3) for k, v in models['base']['accuracy'].items() if v['value'] is not None} }")
    base = _load(Path(models["base"]["path"]))
    tok = base.tokenizer
    ev = data.eval(cfg.eval_n_per_op)
    base_retain = models["base"]["accuracy"]["retain"]["value"]

    for seed in cfg.seeds:
        # -- unlearning
        def stage_unlearn(d: Path, seed=seed) -> dict:
            from excise.intervene.unlearn_methods import unlearn

            rows = {}
            for name, mc in cfg.methods.items():
                seed_everything(seed)
                m = copy.deepcopy(base.model)
                mc = mc.model_copy(update={"seed": seed})
                t0 = time.time()
                log = unlearn(m, tok, data.stream("forget", seed), data.stream("retain", seed + 1), mc)
                acc = evaluate(m, tok, ev)
                _save(m, tok, d / name)
                rows[name] = {"kind": "unlearn", "steps": len(log), "tokens": sum(r["tokens"] for r in log),
                              "seconds": round(time.time() - t0, 1), "accuracy": acc}
                say(f"seed {seed} {name}: forget {acc['forget']['value']:.3f} retain {acc['retain']['value']:.3f}")
            return rows

        unl = run.stage(f"seed{seed}-unlearn", stage_unlearn)

        # -- UNDO
        def stage_undo(d: Path, seed=seed) -> dict:
            from excise.intervene.undo import NoiseConfig, apply_noise, distill
            from excise.locate.fisher import fisher_scores
            from excise.locate.paramdiff import mask_summary, param_diff_scores, param_masks
            from excise.locate.snmf import neuron_param_masks, snmf_scores
            from excise.measure.arithmetic import accuracy_by_op
            from excise.select import SelectConfig, select

            teacher = _load(run.stage_dir(f"seed{seed}-unlearn") / cfg.undo_from)
            check_items = data.eval(cfg.distill.eval_n_per_op, seed=1000 + seed, ops=("add", "sub"))

            def retain_check(m):
                return accuracy_by_op(m, tok, check_items)["retain"].value

            teacher_retain = retain_check(teacher.model)
            f_items = data.train("forget", cfg.localize_n, 20_000 + seed)
            r_items = data.train("retain", cfg.localize_n, 30_000 + seed)
            variants: list[tuple[str, float, Any, dict]] = [(f"undo-global-a{a:g}", a, None, {}) for a in cfg.alphas]
            for t in cfg.targeted:
                if t.localizer == "paramdiff":
                    sc = param_diff_scores(base.model, teacher.model)
                    mask = param_masks(sc, top_p=t.top_p, mode=t.mode)
                elif t.localizer == "fisher":
                    sc = fisher_scores(copy.deepcopy(base.model), tok, f_items)
                    mask = param_masks(sc, top_p=t.top_p, mode=t.mode)
                else:
                    sc = snmf_scores(base, tok, f_items, r_items, cfg.snmf.model_copy(update={"seed": seed}))
                    k = max(1, int(round(t.top_p * base.anatomy.d_mlp)))
                    nm = select(sc, SelectConfig(method="topk", k=k, per_layer=True))
                    mask = neuron_param_masks(base.model, nm.values)
                variants.append((t.name, t.alpha, mask, {"localizer": t.localizer, **mask_summary(mask, base.model)}))
            rows = {}
            for name, alpha, mask, info in variants:
                seed_everything(seed)
                student = copy.deepcopy(teacher.model)
                nz = apply_noise(student, NoiseConfig(alpha=alpha, beta=cfg.beta, seed=seed), mask)
                after_noise = evaluate(student, tok, ev)
                dc = cfg.distill.model_copy(update={"seed": seed})
                res = distill(student, teacher.model, tok, data.stream("mixed", 40_000 + seed), dc,
                              retain_check=retain_check, teacher_retain=teacher_retain)
                acc = evaluate(student, tok, ev)
                _save(student, tok, d / name)
                rows[name] = {"kind": "undo-targeted" if mask is not None else "undo-global", "alpha": alpha,
                              "noise": {**nz, **info}, "after_noise": after_noise, "distill_steps": res["steps"],
                              "distill_tokens": res["tokens"], "distill_flops": res["flops"], "reached": res["reached"],
                              "distill_curve": res["curve"], "teacher_retain": teacher_retain, "accuracy": acc}
                say(f"seed {seed} {name}: distill {res['steps']} steps, forget {acc['forget']['value']:.3f} "
                    f"retain {acc['retain']['value']:.3f}")
            return rows

        undo = run.stage(f"seed{seed}-undo", stage_undo)

        # -- relearning
        def stage_relearn(d: Path, seed=seed) -> dict:
            from excise.attack.relearn_arithmetic import relearn

            rc = cfg.relearn.model_copy(update={"seed": seed})
            r_eval = data.eval(rc.eval_n_per_op, seed=2000 + seed)
            attack = data.train("forget", rc.n_items, 50_000 + seed) if data.files else None
            paths = {"base": Path(models["base"]["path"])}
            if "oracle" in models:
                paths["oracle"] = Path(models["oracle"]["path"])
            paths.update({n: run.stage_dir(f"seed{seed}-unlearn") / n for n in unl.metrics})
            paths.update({n: run.stage_dir(f"seed{seed}-undo") / n for n in undo.metrics})
            rows = {}
            for name, p in paths.items():
                h = _load(p)
                rows[name] = relearn(h.model, tok, rc, eval_items=r_eval, items=attack)
                say(f"seed {seed} relearn {name}: auc {rows[name]['auc']:.3f} steps_to_50 {rows[name]['steps_to_50']}")
            return rows

        run.stage(f"seed{seed}-relearn", stage_relearn)

    def stage_report(d: Path) -> dict:
        return build_report(run, cfg, models, d, base_retain)

    rep = run.stage("report", stage_report)
    say(f"report: {run.stage_dir('report')}")
    return {"dir": str(run.dir), "metrics": rep.metrics, "seconds": round(time.time() - t_start, 1)}


# --- report -------------------------------------------------------------------------------

def build_report(run: Any, cfg: RobustUnlearnConfig, models: dict, d: Path, base_retain: float) -> dict:
    from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
    from excise.measure.stats import mean_ci
    from excise.report.plots import scatter_errorbars

    per: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, v: Any) -> None:
        per.setdefault(name, {}).setdefault(key, []).append(float("nan") if v is None else float(v))

    kinds = {"base": "base", "oracle": "oracle"}
    for seed in cfg.seeds:
        unl = read_json(run.stage_dir(f"seed{seed}-unlearn") / "metrics.json")
        undo = read_json(run.stage_dir(f"seed{seed}-undo") / "metrics.json")
        rel = read_json(run.stage_dir(f"seed{seed}-relearn") / "metrics.json")
        for name in rel:
            if name in models:
                acc = models[name]["accuracy"]
                add(name, "distill_steps", 0)
                add(name, "distill_flops", 0)
            elif name in unl:
                acc = unl[name]["accuracy"]
                kinds[name] = "unlearn"
                add(name, "distill_steps", 0)
                add(name, "distill_flops", 0)
            else:
                acc = undo[name]["accuracy"]
                kinds[name] = undo[name]["kind"]
                add(name, "distill_steps", undo[name]["distill_steps"])
                add(name, "distill_flops", undo[name]["distill_flops"])
                add(name, "reached", 1.0 if undo[name]["reached"] else 0.0)
            add(name, "forget", acc["forget"]["value"])
            add(name, "retain", acc["retain"]["value"])
            add(name, "auc", rel[name]["auc"])
            add(name, "steps_to_50", rel[name]["steps_to_50"])
            add(name, "reached_50", 1.0 if rel[name]["reached_50"] else 0.0)
    rows = []
    for name, vals in per.items():
        row: dict[str, Any] = {"model": name, "kind": kinds.get(name, ""), "n_seeds": len(vals["forget"])}
        for key in ("forget", "retain", "auc", "steps_to_50", "distill_steps", "distill_flops"):
            e = mean_ci(vals.get(key, []))
            row[key] = e.value
            row[f"{key}_lo"] = e.lo
            row[f"{key}_hi"] = e.hi
        row["attack_reached_50_fraction"] = sum(vals["reached_50"]) / len(vals["reached_50"])
        if "reached" in vals:
            row["distill_reached_target_fraction"] = sum(vals["reached"]) / len(vals["reached"])
        row["meets_targets"] = bool(row["forget"] <= 0.05 and row["retain"] >= 0.9 * base_retain) \
            if not math.isnan(row["forget"]) else False
        rows.append(row)
    atomic_write_csv(d / "comparison.csv", rows)
    verdict = _verdict(rows)
    atomic_write_json(d / "comparison.json", {"rows": rows, "verdict": verdict, "base_retain": base_retain,
                                              "seeds": cfg.seeds})
    atomic_write_text(d / "comparison.md", _markdown(rows, verdict, cfg, base_retain))
    pts = [r for r in rows if r["kind"] not in ("base",)]
    scatter_errorbars(
        [r["distill_flops"] for r in pts], [r["auc"] for r in pts],
        [(r["auc_lo"], r["auc_hi"]) for r in pts], [r["model"] for r in pts], d / "tradeoff.png",
        xlabel="distillation compute (estimated FLOPs, 6 * params * tokens)",
        ylabel="relearned forget accuracy (AUC of the attack curve; lower = more robust)",
        title=f"compute vs robustness ({len(cfg.seeds)} seed(s), mean and 95% CI)")
    # forget accuracy vs relearning steps, averaged over seeds, at each model's worst-case learning rate
    from excise.report.plots import lines

    curves: dict[str, dict[int, list[float]]] = {}
    for seed in cfg.seeds:
        rel = read_json(run.stage_dir(f"seed{seed}-relearn") / "metrics.json")
        for name, r in rel.items():
            worst = next(x for x in r["per_lr"] if x["lr"] == r["worst_lr"])
            for pt in worst["curve"]:
                curves.setdefault(name, {}).setdefault(pt["step"], []).append(pt["forget"])
    series = {n: (sorted(c), [sum(c[s]) / len(c[s]) for s in sorted(c)]) for n, c in curves.items()}
    lines(series, d / "relearn_curves.png", xlabel="relearning steps", ylabel="forget accuracy",
          title=f"relearning attack ({cfg.relearn.data} data, worst-case lr; mean over {len(cfg.seeds)} seed(s))")
    return {"n_models": len(rows), "verdict": verdict, "rows": rows}


def _verdict(rows: list[dict]) -> dict:
    """Does any targeted variant reach global UNDO's robustness with less distillation compute?"""
    glob = [r for r in rows if r["kind"] == "undo-global"]
    targ = [r for r in rows if r["kind"] == "undo-targeted"]
    if not glob or not targ:
        return {"answer": "undefined", "reason": "needs both global and targeted UNDO rows"}
    best_g = min(glob, key=lambda r: r["auc"])
    out = []
    for t in targ:
        as_robust = t["auc"] <= best_g["auc"] or (not math.isnan(t["auc_hi"]) and not math.isnan(best_g["auc_lo"])
                                                  and t["auc_lo"] <= best_g["auc_hi"])
        cheaper = t["distill_flops"] < best_g["distill_flops"]
        out.append({"model": t["model"], "auc": t["auc"], "flops": t["distill_flops"], "as_robust_as_best_global": bool(as_robust),
                    "less_compute": bool(cheaper)})
    yes = [o for o in out if o["as_robust_as_best_global"] and o["less_compute"]]
    reached = {r["model"]: r.get("distill_reached_target_fraction", float("nan")) for r in glob + targ}
    caveats = []
    if all(v == 0 for v in reached.values()):
        caveats.append("no UNDO variant recovered retain accuracy to within the tolerance of the teacher inside the "
                       "distillation step budget, so every variant used the same (capped) compute and 'less compute' "
                       "cannot hold; raise distill.max_steps for a compute comparison at equal retain accuracy")
    low = [r["model"] for r in glob + targ if r["retain"] < 0.5]
    if low:
        caveats.append(f"{', '.join(low)} kept retain accuracy below 0.5: a model that lost arithmetic altogether is "
                       "trivially hard to relearn, so read AUC together with the retain column")
    return {"answer": "yes" if yes else "no", "best_global": best_g["model"], "best_global_auc": best_g["auc"],
            "best_global_flops": best_g["distill_flops"], "targeted": out, "distill_reached_target": reached,
            "caveats": caveats,
            "rule": "as robust = mean AUC <= best global's, or 95% CIs overlap; less compute = lower mean distillation FLOPs"}


def _fmt(r: dict, key: str, digits: int = 3) -> str:
    v, lo, hi = r[key], r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key == "distill_flops":
        s = f"{v:.2e}"
        return s if lo is None or math.isnan(lo) else f"{s} [{lo:.1e}, {hi:.1e}]"
    s = f"{v:.{digits}f}" if key != "distill_steps" and key != "steps_to_50" else f"{v:.0f}"
    if lo is None or math.isnan(lo):
        return s
    return f"{s} [{lo:.{digits}f}, {hi:.{digits}f}]" if key not in ("distill_steps", "steps_to_50") else f"{s} [{lo:.0f}, {hi:.0f}]"


def _markdown(rows: list[dict], verdict: dict, cfg: RobustUnlearnConfig, base_retain: float) -> str:
    lines = [f"# Robust unlearning comparison ({len(cfg.seeds)} seed(s): {cfg.seeds})", "",
             "Mean over seeds with 95% t-intervals. forget/retain: exact-match accuracy on held-out strings "
             f"({cfg.eval_n_per_op} per operation). AUC: forget accuracy under the relearning attack "
             f"({cfg.relearn.data} data, lrs {cfg.relearn.lrs}, {cfg.relearn.steps} steps; worst case over lrs). "
             "steps_to_50: first step with forget accuracy >= 0.5 (n/a: never within the attack). "
             f"Targets: forget <= 0.05 and retain >= 0.9 x base ({0.9 * base_retain:.3f}).", "",
             "| model | kind | forget | retain | relearn AUC | steps to 50% | attacks reaching 50% | distill steps | distill FLOPs | meets targets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kind']} | {_fmt(r, 'forget')} | {_fmt(r, 'retain')} | {_fmt(r, 'auc')} | "
                     f"{_fmt(r, 'steps_to_50')} | {r['attack_reached_50_fraction']:.2f} | {_fmt(r, 'distill_steps')} | "
                     f"{_fmt(r, 'distill_flops')} | {'yes' if r['meets_targets'] else 'no'} |")
    lines += ["", "## Does targeted noise reach global UNDO's robustness with less distillation compute?", ""]
    if verdict.get("answer") == "undefined":
        lines.append(f"Undefined: {verdict['reason']}.")
    else:
        lines.append(f"**{verdict['answer']}** (rule: {verdict['rule']}). Best global: {verdict['best_global']} "
                     f"(AUC {verdict['best_global_auc']:.3f}, {verdict['best_global_flops']:.2e} FLOPs).")
        for t in verdict["targeted"]:
            lines.append(f"- {t['model']}: AUC {t['auc']:.3f}, {t['flops']:.2e} FLOPs; as robust: "
                         f"{'yes' if t['as_robust_as_best_global'] else 'no'}; less compute: {'yes' if t['less_compute'] else 'no'}")
        lines.append("")
        lines.append("Distillation reached the retain target (within tolerance of the teacher) in: " + ", ".join(
            f"{k} {v:.0%}" for k, v in verdict["distill_reached_target"].items()))
        for c in verdict["caveats"]:
            lines.append(f"- caveat: {c}.")
    return "\n".join(lines) + "\n"


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    from excise.config import validate

    cfg = validate(RobustUnlearnConfig, settings, source)
    for name, m in cfg.methods.items():
        if m.method not in METHODS:  # pragma: no cover - pydantic already checks
            raise ValueError(name)
    if quick:
        cfg = quick_variant(cfg)
    return run_robust_unlearn(cfg, out, force=force, console=console, quick=quick)
