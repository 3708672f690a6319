"""Tables, targets and figures of the concept-unlearning workflow.

Pure formatting and writing of measures the workflow already computed (no model here), so the
report can change without touching the stages that train and evaluate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from excise.io import atomic_write_json, atomic_write_text
from excise.recipes.concept_config import ConceptUnlearnConfig
from excise.report.plots import heatmap, lines
from excise.run import write_metrics


def est_cell(m: dict | None, pct: bool = True) -> str:
    """One estimate as ``value [lo, hi] (n=..)``, in percent when ``pct``."""
    if not m or m.get("value") is None or m["value"] != m["value"]:  # None or NaN: no item to measure
        return f"undefined (n={(m or {}).get('n') or 0})"
    f = (lambda x: f"{100 * x:.0f}") if pct else (lambda x: f"{x:.3g}")
    lo, hi = m.get("lo"), m.get("hi")
    ci = f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else ""
    return f"{f(m['value'])}{ci} (n={m['n']})"


ROWS = [("leak.direct", "leak % direct", True), ("leak.paraphrase", "leak % paraphrase", True),
        ("leak.adversarial", "leak % adversarial (all families)", True),
        ("answer_logprob.direct", "answer log-prob direct", False), ("answer_prob.direct", "answer prob direct", False),
        ("retain_accuracy", "retain accuracy % (screened items)", True),
        ("retain_accuracy_unscreened", "retain accuracy % (unscreened items)", True), ("retain_accuracy.neighbour", "retain % neighbour films", True),
        ("retain_accuracy.unrelated", "retain % unrelated facts", True), ("neutral_perplexity", "neutral perplexity", False)]


def family_rows(metrics: dict) -> list[tuple[str, str, bool]]:
    return [(k, f"leak % {k[len('leak.adv_'):]}", True) for k in sorted(metrics) if k.startswith("leak.adv_")]


def markdown_table(columns: dict[str, dict], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown table: one row per measure, one column per model state."""
    first = next(iter(columns.values()))
    rows = ROWS[:3] + family_rows(first) + ROWS[3:]
    names = list(columns)
    out = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    absent = []
    for key, label, pct in rows:
        cells = [est_cell(columns[n].get(key), pct) for n in names]
        if all(c.startswith("undefined") for c in cells):  # no state has items for it (e.g. no adversarial probes)
            absent.append(label)
            continue
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, cells in (extra or {}).items():
        out.append(f"| {label} | " + " | ".join(cells.get(n, "") for n in names) + " |")
    note = f"\nNot measured (no items in this spec): {'; '.join(absent)}.\n" if absent else ""
    return "\n".join(out) + "\n" + note


def check_targets(before: dict, after: dict) -> dict:
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
    ub, ua = v(before, "retain_accuracy_unscreened"), v(after, "retain_accuracy_unscreened")
    out["retain_unscreened_drop_pts"] = {"value": None if ub is None or ua is None else 100 * (ub - ua), "met": None}
    out["perplexity_rise_le_10pct"] = {"value": rise, "met": rise is not None and rise <= 10}
    out["adversarial_leak"] = {"value": v(after, "leak.adversarial"), "met": None}
    return out


def write_before_after(d: Path, cfg: ConceptUnlearnConfig, name: str, variant: str, kept: dict, before: dict,
                       after: dict, info: dict) -> dict:
    """``before_after.md``, the before/after metrics and ``targets.json``; returns the targets."""
    kept_line = ", ".join(f"{k} {v['kept']}/{v['candidates']}" for k, v in kept.items() if isinstance(v, dict) and "kept" in v)
    sp = kept.get("splits") or {}
    splits = (f"Training and evaluation items are disjoint: the unlearning and the localization train on "
              f"{sp.get('forget_train')} forget items and {sp.get('retain_train')} retain items ({sp.get('retain_train_from')}); "
              f"direct leak is measured on {sp.get('direct_heldout')} held-out direct probes ({sp.get('direct_from')}). "
              f"Retain accuracy (screened) is measured on the {sp.get('retain_eval_screened')} retain evaluation items the "
              f"base model answers correctly, so its baseline is 100% by construction when screening is on; "
              f"retain accuracy (unscreened) on all {sp.get('retain_eval_unscreened')} retain evaluation items.\n\n") if sp else ""
    extra = {"trainable parameters": {"base": "-", variant: f"{info['n_trainable']:,} ({info['n_effective']:,} free)"},
             "max abs dW outside mask": {"base": "-", variant: f"{info.get('delta_outside_mask')}"},
             "base params changed": {"base": "-", variant: str(info.get("base_params_changed"))},
             "train time (s)": {"base": "-", variant: str(info["train_seconds"])}}
    md = (f"# {name}: before / after ({variant}, {cfg.unlearn.objective}, {cfg.unlearn.steps} steps)\n\n"
          f"Items kept after screening the base model: {kept_line}.\n\n" + splits + markdown_table({"base": before, variant: after}, extra))
    atomic_write_text(d / "before_after.md", md)
    rows = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key) or {}, after.get(key) or {}
        rows.append({"measure": key, **{f"before_{k}": b.get(k) for k in ("value", "lo", "hi", "n")},
                     **{f"after_{k}": a.get(k) for k in ("value", "lo", "hi", "n")}})
    write_metrics(d, rows, name="before_after")
    targets = check_targets(before, after)
    atomic_write_json(d / "targets.json", targets)
    return targets


def write_comparison(d: Path, cfg: ConceptUnlearnConfig, name: str, n_selected: int, cols: dict[str, dict],
                     extra: dict[str, dict[str, str]], curves: dict[str, list], *, n_train: int | None = None,
                     n_check: int | None = None) -> None:
    """``comparison.md``, the comparison metrics, ``relearning.png`` and ``comparison.png``."""
    rl = cfg.comparison.relearn
    lrs = ", ".join(f"{x:g}" for x in dict.fromkeys([rl.lr, *rl.lrs]))
    check = "held-out direct probes" if cfg.comparison.relearn_check == "direct" else "paraphrases"
    md = (f"# {name}: comparison at equal steps ({cfg.unlearn.objective}, {cfg.unlearn.steps} steps, "
          f"{cfg.units} masks of {n_selected} units)\n\n" + markdown_table(cols, extra)
          + f"\nRelearning: {rl.mode} fine-tuning (lr {lrs}; the worst case, the fastest return, is reported) on the "
            f"{n_train} training forget items; the concept is back when the leak rate on the {n_check} {check} "
            f"(never trained on) reaches {rl.threshold}.\n")
    atomic_write_text(d / "comparison.md", md)
    rows = []
    for v, mets in cols.items():
        for k, e in mets.items():
            rows.append({"variant": v, "measure": k, **(e or {})})
    write_metrics(d, rows, name="comparison")
    lines({k: ([x for x, _ in pts], [y for _, y in pts]) for k, pts in curves.items()}, d / "relearning.png",
          title=f"relearning {name}: {cfg.comparison.relearn_check} leak rate",
          xlabel="fine-tuning steps on the forget facts", ylabel="leak rate",
          hline=cfg.comparison.relearn.threshold)
    keys = ["leak.direct", "leak.paraphrase", "leak.adversarial", "retain_accuracy"]
    mat = np.array([[(cols[v].get(k) or {}).get("value") or np.nan for k in keys] for v in cols], dtype=float)
    heatmap(mat, d / "comparison.png", title="leak and retain rates by method", xlabel="measure", ylabel="method",
            xticklabels=keys, yticklabels=list(cols), annotate=True, cmap="viridis")
