"""The pieces an HTML report is made of: formatted cells, tables, targets checked against a CI, and
what each figure shows. Plain dicts (no model, no torch), so the report is built from files alone."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from excise.io import read_json

STATUSES = ("met", "not met", "uncertain", "not measured")


def is_est(x: Any) -> bool:
    """An estimate as every evaluator writes it: a mapping with a value and an n."""
    return isinstance(x, Mapping) and "value" in x and "n" in x


def val(e: Any) -> float | None:
    """The estimate's value, or None when it is undefined (n = 0, null or NaN)."""
    if not is_est(e) or e.get("value") is None or not e.get("n"):
        return None
    v = float(e["value"])
    return None if math.isnan(v) else v


def num(x: Any, scale: float = 1.0) -> str:
    """A number at a readable precision (3 decimals for rates, fewer as it grows); n/a when undefined."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    x = float(x) * scale
    a = abs(x)
    if scale != 1.0 and a < 1e5:  # a rate shown x100: one decimal, as in the docs
        return f"{x:.1f}"
    if a >= 1e5 or (0 < a < 1e-3):
        return f"{x:.2e}"
    return f"{x:,.0f}" if a >= 1000 else f"{x:.1f}" if a >= 10 else f"{x:.3f}"


def fmt(e: Any, scale: float = 1.0, with_n: bool = True) -> str:
    """``value [lo, hi] (n=..)``, or ``undefined (n=0)``."""
    v = val(e)
    if v is None:
        return "undefined (n=0)" if is_est(e) or e is None else num(e, scale)
    lo, hi = e.get("lo"), e.get("hi")
    ci = f" [{num(lo, scale)}, {num(hi, scale)}]" if lo is not None and hi is not None else ""
    return f"{num(v, scale)}{ci}" + (f" (n={e['n']})" if with_n else "")


def cell(x: Any, scale: float = 1.0, with_n: bool = True) -> dict[str, Any]:
    """A table cell: its text, and the number it sorts by (None sorts last)."""
    if is_est(x):
        v = val(x)
        return {"text": fmt(x, scale, with_n), "v": None if v is None else v * scale}
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return {"text": num(x, scale), "v": None if isinstance(x, float) and math.isnan(x) else x * scale}
    return {"text": "n/a" if x is None else str(x), "v": None}


def change(before: Any, after: Any, scale: float = 1.0) -> dict[str, Any]:
    b, a = val(before) if is_est(before) else before, val(after) if is_est(after) else after
    if b is None or a is None:
        return {"text": "n/a", "v": None}
    return {"text": ("+" if a > b else "") + num(a - b, scale), "v": (a - b) * scale}


def table(caption: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], *, foot: Iterable[Iterable[Any]] = (),
          sortable: bool = True, note: str = "") -> dict[str, Any]:
    """A semantic table: the first cell of each row is its header; other cells go through :func:`cell`."""
    def norm(r: Iterable[Any]) -> list[Any]:
        r = list(r)
        return [str(r[0])] + [c if isinstance(c, Mapping) and "text" in c else cell(c) for c in r[1:]]

    return {"caption": caption, "columns": list(columns), "rows": [norm(r) for r in rows],
            "foot": [norm(r) for r in foot], "sortable": sortable, "note": note}


def before_after(caption: str, rows: Iterable[tuple[str, Any, Any, float]], names: tuple[str, str] = ("before", "after"),
                 note: str = "") -> dict[str, Any]:
    """Rows of (measure, before, after, scale) with the change after - before."""
    return table(caption, ["measure", *names, "change"],
                 [(lab, cell(b, s), cell(a, s), change(b, a, s)) for lab, b, a, s in rows], sortable=False, note=note)


def target(text: str, est: Any, op: str, threshold: float | None, *, scale: float = 1.0, unit: str = "") -> dict[str, Any]:
    """A target checked against the estimate's 95% CI: met when the whole CI meets it, not met when
    none of it does, uncertain when the CI spans the threshold; a point estimate without CI decides alone."""
    v = val(est) if is_est(est) else est
    if v is None or threshold is None:
        return {"text": text, "status": "not measured", "detail": "no measurement (n = 0, or the stage did not run)"}

    def good(x: float) -> bool:
        return x <= threshold if op == "<=" else x >= threshold

    shown = f"measured {fmt(est, scale) if is_est(est) else num(v, scale)}{unit}; target {op} {num(threshold, scale)}{unit}"
    lo, hi = (est.get("lo"), est.get("hi")) if is_est(est) else (None, None)
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return {"text": text, "status": "met" if good(v) else "not met", "detail": shown + " (no CI: point estimate)"}
    if good(lo) and good(hi):
        return {"text": text, "status": "met", "detail": shown + " (the whole 95% CI meets it)"}
    if not good(lo) and not good(hi):
        return {"text": text, "status": "not met", "detail": shown + " (the whole 95% CI misses it)"}
    return {"text": text, "status": "uncertain",
            "detail": shown + f" (the 95% CI spans the target; the point estimate {'meets' if good(v) else 'misses'} it)"}


def flag(text: str, ok: bool | None, detail: str) -> dict[str, Any]:
    """A yes/no target the workflow already decided (no CI to read)."""
    return {"text": text, "status": "not measured" if ok is None else "met" if ok else "not met", "detail": detail}


def all_of(text: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several targets that must all hold: not met if one is not, met if all are, else uncertain."""
    st = [p["status"] for p in parts]
    status = ("not met" if "not met" in st else "not measured" if "not measured" in st
              else "uncertain" if "uncertain" in st else "met")
    return {"text": text, "status": status, "detail": "; ".join(f"{p['text']}: {p['detail']}" for p in parts)}


def load(d: Path, rel: str) -> Any:
    """A JSON file of the run, or None when that stage did not write it."""
    p = d / rel
    return read_json(p) if p.is_file() else None


# What each figure shows and what to look for, by file name (first match wins).
FIGURES = [
    ("pareto.png", "Every method's test macro-F1 (x) against its equalized-odds difference (y, 95% CI). Lower right "
                   "is better: look for fair LoRA below plain LoRA without moving far to the left."),
    ("checkpoints.png", "Every training checkpoint on the validation split. The chosen one should have a small EO gap "
                        "without giving up macro-F1; the test split never chooses."),
    ("calibration.png", "Predicted probability against observed frequency on the test split: the closer to the "
                        "diagonal, the better calibrated."),
    ("patching.png", "Share of the gender-swapped twin's signal carried when one site is patched into the scene: a "
                     "site near 1 carries gender on its own; where the curve first rises is where gender enters."),
    ("relearning.png", "Leak rate while an attacker fine-tunes on the forget facts: a curve that stays under the "
                       "dashed threshold for longer resists relearning."),
    ("relearn_curves.png", "Forget accuracy during the relearning attack (worst-case learning rate): lower and "
                           "flatter means the removal is more robust."),
    ("tradeoff.png", "Distillation compute (x) against relearned forget accuracy (y, AUC, 95% CI): lower is more "
                     "robust, further left is cheaper."),
    ("comparison.png", "Leak and retain rates by method: low leak with high retain is the goal."),
    ("heads_ablation.png", "Drop of the biased log-odds when each candidate head is ablated (95% CI): the selected "
                           "heads should be the largest drops, with CIs above 0."),
    ("heads_*.png", "Per-head scores of the bias localizer (layer x head): bright cells are the candidates."),
    ("bias_scores.png", "Bias scores and accuracies by BBQ category with 95% CIs: s_AMB near 0 means no bias in "
                        "ambiguous contexts."),
    ("attention_heads_*.png", "Attention patterns per layer on a traced prompt; after mitigation the pruned heads "
                              "should look flatter."),
    ("attention_entropy_*.png", "Attention entropy per head: pruned or damaged heads show up as outliers."),
    ("hidden_norms_*.png", "Hidden-state norm per layer and token: compare before with after for layers that moved."),
    ("mlp_out_norms_*.png", "MLP output norm per layer and token: compare before with after."),
    ("last_hidden_*.png", "Last-layer hidden states of the traced prompts."),
    ("saliency_heads_*.png", "Saliency score per attention head for the concept: bright cells drive the forget answers."),
    ("saliency_neurons_*.png", "Top neuron saliency scores per layer (sorted): where the concept's neurons sit."),
    ("mask_*.png", "The selected units (dark): the only places the masked update may change."),
    ("examples/*.png", "A held-out scene from the examples table of the workflow's report.md."),
]


def figure_caption(rel: str) -> str:
    name = Path(rel).name
    for pat, text in FIGURES:
        if fnmatch.fnmatch(rel, f"*{pat}") or fnmatch.fnmatch(name, pat):
            return text
    return f"Figure written by the {Path(rel).parts[0]} stage."
