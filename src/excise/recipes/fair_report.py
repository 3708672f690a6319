"""The fair-encoder report: every method side by side on the test split, plots, the issue's targets.

Reads what the earlier stages saved (GroupedResults, training histories, calibration curves) so
the report can be rebuilt from a finished run without any model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from excise.measure.frame import GroupedResult
from excise.report.plots import lines, scatter_errorbars

UTILITY, GAP = "macro_f1", "eo_diff"


def _load(p: Path) -> GroupedResult:
    return GroupedResult.from_dict(read_json(p))


def methods(run_dir: Path) -> dict[str, GroupedResult]:
    """Test results by method name: the baselines, plain LoRA and fair LoRA."""
    out = {}
    for p in sorted((run_dir / "baselines").glob("baseline_*.json")):
        r = _load(p)
        out[r.meta.get("method", p.stem)] = r
    for stage, name in (("plain", "plain LoRA"), ("fair", "fair LoRA")):
        if (run_dir / stage / "test.json").exists():
            out[name] = _load(run_dir / stage / "test.json")
    return out


def _cell(e: Any, pct: bool = False) -> str:
    if e is None or not e.defined:
        return "undefined (n=0)"
    f = 100.0 if pct else 1.0
    lo = "" if math.isnan(e.lo) else f" [{e.lo * f:.3f}, {e.hi * f:.3f}]"
    return f"{e.value * f:.3f}{lo}"


def _targets(res: dict[str, GroupedResult], cf: dict[str, GroupedResult]) -> dict[str, Any]:
    """The issue's targets, measured on this run (one seed; the benchmark averages three)."""
    t: dict[str, Any] = {}
    plain, fair = res.get("plain LoRA"), res.get("fair LoRA")
    if plain and fair:
        pe, fe_ = plain.difference(GAP).value, fair.difference(GAP).value
        df1 = fair[UTILITY].value - plain[UTILITY].value
        t["eo_at_most_half_of_plain"] = {"plain": pe, "fair": fe_, "ratio": fe_ / pe if pe else math.nan,
                                         "met": bool(fe_ <= 0.5 * pe)}
        t["macro_f1_at_most_2_points_lower"] = {"delta": df1, "met": bool(df1 >= -0.02)}
        for name, r in res.items():
            if name.startswith("fairlearn"):
                t[f"vs {name}"] = {"delta_macro_f1": fair[UTILITY].value - r[UTILITY].value,
                                   "delta_eo": fe_ - r.difference(GAP).value,
                                   "fair_lower_eo_at_no_lower_f1": bool(fe_ < r.difference(GAP).value
                                                                       and fair[UTILITY].value >= r[UTILITY].value - 0.005)}
    if "frozen" in cf and "fair" in cf:
        b, a = cf["frozen"]["flip_rate"], cf["fair"]["flip_rate"]
        t["counterfactual_flip_rate_falls"] = {"before": b.value, "after": a.value, "met": bool(a.value < b.value)}
    return t


def write_report(run_dir: Path, d: Path, cfg: Any) -> dict:
    """report.md, comparison.csv, pareto.png, checkpoints.png, calibration.png, targets.json."""
    res = methods(run_dir)
    rows = []
    for name, r in res.items():
        rows.append({"method": name, **{f"{m}": r[m].value for m in ("accuracy", UTILITY, "roc_auc") if m in r.overall},
                     **{f"{m}_lo": r[m].lo for m in (UTILITY,)}, **{f"{m}_hi": r[m].hi for m in (UTILITY,)},
                     **{k: r.difference(k).value for k in (GAP, "dp_diff", "tpr_gap", "fpr_gap")},
                     f"{GAP}_lo": r.difference(GAP).lo, f"{GAP}_hi": r.difference(GAP).hi, "n": r[UTILITY].n})
    atomic_write_csv(d / "comparison.csv", rows)
    scatter_errorbars([r[UTILITY].value for r in res.values()], [r.difference(GAP).value for r in res.values()],
                      [(r.difference(GAP).lo, r.difference(GAP).hi) for r in res.values()], list(res), d / "pareto.png",
                      xlabel="test macro-F1", ylabel="test equalized-odds difference (95% CI)",
                      title="utility vs fairness, every method (lower right is better)")
    pts, labels = [], []
    for stage in ("plain", "fair"):
        p = run_dir / stage / "train" / "training_history.json"
        for row in (read_json(p)["epochs"] if p.exists() else []):
            pts.append((row.get("val_macro_f1", math.nan), row.get("val_eo_gap", math.nan)))
            labels.append(f"{stage} e{row['epoch']}")
    if pts:
        scatter_errorbars([x for x, _ in pts], [y for _, y in pts], [(math.nan, math.nan)] * len(pts), labels,
                          d / "checkpoints.png", xlabel="validation macro-F1", ylabel="validation EO gap",
                          title="every checkpoint (validation; the test split is never used to choose)")
    curves = {}
    for stage in ("plain", "fair"):
        p = run_dir / stage / "calibration.json"
        if p.exists():
            c = read_json(p)
            keep = [i for i, v in enumerate(c["confidence"]) if v is not None]
            curves[stage] = ([c["confidence"][i] for i in keep], [c["accuracy"][i] for i in keep])
    if curves:
        curves["perfect"] = ([0.0, 1.0], [0.0, 1.0])
        lines(curves, d / "calibration.png", xlabel="predicted probability", ylabel="observed frequency",
              title="calibration on the test split (after temperature scaling on validation)")
    cf = {}
    for stage, key in (("baselines", "frozen"), ("plain", "plain"), ("fair", "fair")):
        p = run_dir / stage / "counterfactual.json"
        if p.exists():
            cf[key] = _load(p)
    targets = _targets(res, cf)
    atomic_write_json(d / "targets.json", targets)
    text = _markdown(res, cf, targets, run_dir)
    atomic_write_text(d / "report.md", text)
    return {"targets": targets, "methods": {r["method"]: {UTILITY: r.get(UTILITY), GAP: r[GAP]} for r in rows}}


def _markdown(res: dict[str, GroupedResult], cf: dict[str, GroupedResult], targets: dict, run_dir: Path) -> str:
    out = ["# Fair encoder: every method on the test split", "",
           "| method | accuracy | macro-F1 | EO difference | DP difference | TPR gap | n |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        out.append(f"| {name} | {_cell(r['accuracy'])} | {_cell(r[UTILITY])} | {_cell(r.difference(GAP))} | "
                   f"{_cell(r.difference('dp_diff'))} | {_cell(r.difference('tpr_gap'))} | {r[UTILITY].n} |")
    for name in ("plain LoRA", "fair LoRA"):
        r = res.get(name)
        if r is None:
            continue
        out += ["", f"### {name} by {r.group_by}", "", "| group | accuracy | macro-F1 | TPR | FPR | ECE | n |",
                "|---|---|---|---|---|---|---|"]
        for g, ms in r.by_group.items():
            out.append(f"| {g} | " + " | ".join(_cell(ms.get(m)) for m in ("accuracy", UTILITY, "tpr", "fpr", "ece"))
                       + f" | {ms['accuracy'].n} |")
    sel = [read_json(run_dir / s / "metrics.json") for s in ("plain", "fair") if (run_dir / s / "metrics.json").exists()]
    out += ["", "Checkpoints: " + "; ".join(f"{s}: epoch {m['selected_epoch']} ({m['selection']})"
                                             for s, m in zip(("plain", "fair"), sel))]
    skipped = read_json(run_dir / "baselines" / "metrics.json").get("skipped", []) \
        if (run_dir / "baselines" / "metrics.json").exists() else []
    out += [f"Skipped: {s}" for s in skipped]
    if cf:
        out += ["", "## Counterfactual matching (Grep-BiasIR, relevant documents)", "",
                "| encoder | cosine gap (masc - fem) | masculine higher | top document flips |", "|---|---|---|---|"]
        for k, r in cf.items():
            out.append(f"| {k} | {_cell(r['cos_gap'])} | {_cell(r['masc_higher'])} | {_cell(r['flip_rate'])} |")
    out += ["", "## Targets (this run, one seed)", ""]
    for k, v in targets.items():
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"
