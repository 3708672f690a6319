"""The report stage of the robust-unlearning workflow: per-model means over seeds with 95% CIs,
the targeted-vs-global UNDO verdict, ``comparison.csv`` / ``.json`` / ``.md`` and the figures.

Reads only the stages' ``metrics.json`` files, so it can change without touching the training code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from excise.measure.stats import mean_ci
from excise.recipes.robust_config import RobustUnlearnConfig
from excise.report.plots import lines, scatter_errorbars


def build_report(run: Any, cfg: RobustUnlearnConfig, models: dict, d: Path, base_retain: float) -> dict:
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
                add(name, "retain_after_noise", undo[name]["after_noise"]["retain"]["value"])
                add(name, "forget_after_noise", undo[name]["after_noise"]["forget"]["value"])
            add(name, "forget", acc["forget"]["value"])
            add(name, "retain", acc["retain"]["value"])
            add(name, "auc", rel[name]["auc"])
            add(name, "steps_to_50", rel[name]["steps_to_50"])
            add(name, "reached_50", 1.0 if rel[name]["reached_50"] else 0.0)
    rows = []
    for name, vals in per.items():
        row: dict[str, Any] = {"model": name, "kind": kinds.get(name, ""), "n_seeds": len(vals["forget"])}
        for key in ("forget", "retain", "auc", "steps_to_50", "distill_steps", "distill_flops", "retain_after_noise",
                    "forget_after_noise"):
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
    dist = _distill_curves(run, cfg, d)
    atomic_write_text(d / "comparison.md", _markdown(rows, verdict, cfg, base_retain) + (_curve_table(dist) if dist else ""))
    pts = [r for r in rows if r["kind"] not in ("base",)]
    scatter_errorbars(
        [r["distill_flops"] for r in pts], [r["auc"] for r in pts],
        [(r["auc_lo"], r["auc_hi"]) for r in pts], [r["model"] for r in pts], d / "tradeoff.png",
        xlabel="distillation compute (estimated FLOPs, 6 * params * tokens)",
        ylabel="relearned forget accuracy (AUC of the attack curve; lower = more robust)",
        title=f"compute vs robustness ({len(cfg.seeds)} seed(s), mean and 95% CI)")
    # forget accuracy vs relearning steps, averaged over seeds, at each model's worst-case learning rate
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
    return {"n_models": len(rows), "verdict": verdict, "rows": rows, "distill_curves": dist}


def _distill_curves(run: Any, cfg: RobustUnlearnConfig, d: Path) -> dict:
    """Distillation curves per UNDO variant, mean over seeds: KL loss, retain and forget accuracy (check pool)."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = {}
    for seed in cfg.seeds:
        for name, r in read_json(run.stage_dir(f"seed{seed}-undo") / "metrics.json").items():
            for pt in r.get("distill_curve", []):
                for key in ("loss", "retain", "forget"):
                    if pt.get(key) is not None:
                        acc.setdefault(name, {}).setdefault(key, {}).setdefault(pt["step"], []).append(float(pt[key]))
    out = {n: {k: {s: sum(v) / len(v) for s, v in sorted(c.items())} for k, c in keys.items()} for n, keys in acc.items()}
    if not out:
        return {}
    lines({f"{n} {k}": (list(c[k]), list(c[k].values())) for n, c in out.items() for k in ("retain", "forget") if k in c},
          d / "distill_accuracy.png", xlabel="distillation steps", ylabel="accuracy (early-stop pool)",
          title=f"UNDO distillation: retain and forget accuracy (mean over {len(cfg.seeds)} seed(s))")
    loss = {n: (list(c["loss"]), list(c["loss"].values())) for n, c in out.items() if c.get("loss")}
    if loss:
        lines(loss, d / "distill_loss.png", xlabel="distillation steps", ylabel="KL(teacher || student), mean since last point",
              title="UNDO distillation loss")
    return out


def _curve_table(curves: dict) -> str:
    out = ["", "## Distillation curves (early-stop pool; mean over seeds)", "",
           "Retain / forget accuracy and mean KL since the previous point, by distillation step.", "",
           "| variant | step | retain | forget | KL |", "|---|---|---|---|---|"]
    for name, c in curves.items():
        for step in sorted(set().union(*[set(v) for v in c.values()])):
            cell = [f"{c[k][step]:.3f}" if step in c.get(k, {}) else "n/a" for k in ("retain", "forget", "loss")]
            out.append(f"| {name} | {step} | {' | '.join(cell)} |")
    return "\n".join(out) + "\n"


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
    out = [f"# Robust unlearning comparison ({len(cfg.seeds)} seed(s): {cfg.seeds})", "",
           "Mean over seeds with 95% t-intervals. forget/retain: exact-match accuracy on held-out strings "
           f"({cfg.eval_n_per_op} per operation). AUC: forget accuracy under the relearning attack "
           f"({cfg.relearn.data} data, lrs {cfg.relearn.lrs}, {cfg.relearn.steps} steps; worst case over lrs). "
           "steps_to_50: first step with forget accuracy >= 0.5 (n/a: never within the attack). "
           f"Targets: forget <= 0.05 and retain >= 0.9 x base ({0.9 * base_retain:.3f}).", "",
           "retain after noise: the UNDO student right after noising, before distillation.", "",
           "| model | kind | forget | retain | retain after noise | relearn AUC | steps to 50% | attacks reaching 50% | distill steps | distill FLOPs | meets targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['kind']} | {_fmt(r, 'forget')} | {_fmt(r, 'retain')} | {_fmt(r, 'retain_after_noise')} | {_fmt(r, 'auc')} | "
                   f"{_fmt(r, 'steps_to_50')} | {r['attack_reached_50_fraction']:.2f} | {_fmt(r, 'distill_steps')} | "
                   f"{_fmt(r, 'distill_flops')} | {'yes' if r['meets_targets'] else 'no'} |")
    out += ["", "## Does targeted noise reach global UNDO's robustness with less distillation compute?", ""]
    if verdict.get("answer") == "undefined":
        out.append(f"Undefined: {verdict['reason']}.")
    else:
        out.append(f"**{verdict['answer']}** (rule: {verdict['rule']}). Best global: {verdict['best_global']} "
                   f"(AUC {verdict['best_global_auc']:.3f}, {verdict['best_global_flops']:.2e} FLOPs).")
        for t in verdict["targeted"]:
            out.append(f"- {t['model']}: AUC {t['auc']:.3f}, {t['flops']:.2e} FLOPs; as robust: "
                       f"{'yes' if t['as_robust_as_best_global'] else 'no'}; less compute: {'yes' if t['less_compute'] else 'no'}")
        out.append("")
        out.append("Distillation reached the retain target (within tolerance of the teacher) in: " + ", ".join(
            f"{k} {v:.0%}" for k, v in verdict["distill_reached_target"].items()))
        for c in verdict["caveats"]:
            out.append(f"- caveat: {c}.")
    return "\n".join(out) + "\n"
