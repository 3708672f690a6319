"""Reporting of the BBQ workflow (:mod:`excise.recipes.bbq_debias`): before/after rows with CIs
(``unlearning_results.csv``), the summary dict (``summary.json``), its text form and the
activation heatmaps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from excise.report.plots import heatmap
from excise.tasks.bbq_prompts import loglik_prompt
from excise.trace import Trace

METRICS = ("s_amb", "s_dis", "acc_ambig", "acc_disambig")


def unlearning_rows(before: dict, after: dict) -> list[dict[str, Any]]:
    """One row per (group, metric): before and after with CIs and n, and the change."""
    rows = []
    groups = ["overall", *before.get("groups", {})]
    for g in groups:
        b = before["overall"] if g == "overall" else before["groups"].get(g)
        a = after["overall"] if g == "overall" else after["groups"].get(g)
        if b is None or a is None:
            continue
        for m in METRICS:
            bv, av = b[m], a[m]
            bval = _num(bv["value"])
            aval = _num(av["value"])
            rows.append({"group": g, "metric": m, "before": bval, "before_lo": _num(bv["lo"]), "before_hi": _num(bv["hi"]),
                         "before_n": bv["n"], "after": aval, "after_lo": _num(av["lo"]), "after_hi": _num(av["hi"]),
                         "after_n": av["n"], "change": aval - bval})
    return rows


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def summarize(model: str, before: dict, after: dict, loc: dict, mit: dict, aft: dict) -> dict[str, Any]:
    sb, sa = _num(before["s_amb"]["value"]), _num(after["s_amb"]["value"])
    db, da = _num(before["acc_disambig"]["value"]), _num(after["acc_disambig"]["value"])
    s = {
        "model": model,
        "before": {m: before[m] for m in METRICS},
        "after": {m: after[m] for m in METRICS},
        "s_amb_drop_pct": 100.0 * (sb - sa) / abs(sb) if sb and not math.isnan(sb) else float("nan"),
        "acc_disambig_change_points": 100.0 * (da - db),
        "s_amb_ci_excludes_0_before": _excludes0(before["s_amb"]),
        "pruned_heads": mit.get("pruned_heads"),
        "head_scale": mit.get("head_scale"),
        "finetune": {k: v for k, v in (mit.get("finetune") or {}).items() if k != "losses"},
        "base_weights_max_change": mit.get("base_weights_max_change"),
        "reload_max_abs_diff": aft.get("reload_max_abs_diff"),
    }
    if "precision_at_k" in loc:
        s["planted_heads"] = loc["planted_heads"]
        s["precision_at_k"] = loc["precision_at_k"]
    return s


def _excludes0(e: dict) -> bool:
    lo, hi = e.get("lo"), e.get("hi")
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _fmt(e: dict, pct: bool = True) -> str:
    if e.get("value") is None or e.get("n", 0) == 0:
        return "undefined (n=0)"
    k = 100 if pct else 1
    lo, hi = e.get("lo"), e.get("hi")
    ci = f" [{k * lo:.1f}, {k * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{k * e['value']:.1f}{ci}"


def summary_text(s: dict) -> str:
    lines = [f"{s['model']}: before -> after mitigation (x100, 95% CI)"]
    names = {"s_amb": "s_AMB", "s_dis": "s_DIS", "acc_ambig": "accuracy ambiguous", "acc_disambig": "accuracy disambiguated"}
    for m in METRICS:
        lines.append(f"  {names[m]:24s} {_fmt(s['before'][m]):>24s}  ->  {_fmt(s['after'][m]):>24s}   n={s['after'][m]['n']}")
    lines.append(f"  s_AMB change: {-s['s_amb_drop_pct']:+.0f}% of its before value; disambiguated accuracy change: "
                 f"{s['acc_disambig_change_points']:+.1f} points; pruned heads {s['pruned_heads']} x{s['head_scale']}")
    if "precision_at_k" in s:
        lines.append(f"  planted heads {s['planted_heads']}: localization precision@{len(s['planted_heads'])} = "
                     f"{s['precision_at_k']:.2f}")
    return "\n".join(lines) + "\n"


def activation_maps(handle: Any, items: Sequence[Any], directory: Path, tag: str) -> dict[str, Any]:
    """Hidden states (every layer and the last), MLP outputs and every head's attention for the
    traced prompts, as heatmaps; returns the per-layer summaries (for before/after differences)."""
    an = handle.anatomy
    L, H = an.n_layers, an.n_heads
    texts = [loglik_prompt(x) for x in items]
    batch = handle.encode(texts)
    eager = getattr(handle.model.config, "_attn_implementation", None) in (None, "eager")
    sites = ["resid.*", "mlp.*.out"] + (["attn.*.pattern"] if eager else [])
    with torch.inference_mode(), Trace(handle, sites, pool="last") as tr:
        handle.model(**batch)
    resid = np.stack([tr.cache[f"resid.{l}"].float().norm(dim=-1).cpu().numpy() for l in range(L)])  # [L, B]
    mlp = np.stack([tr.cache[f"mlp.{l}.out"].float().norm(dim=-1).cpu().numpy() for l in range(L)])
    last = tr.cache[f"resid.{L - 1}"][0].float().cpu().numpy()
    labels = [f"{x.category[:10]}#{x.example_id}" for x in items]
    heatmap(resid, directory / f"hidden_norms_{tag}.png", title=f"hidden state L2 norm at the last token ({tag})",
            xlabel="prompt", ylabel="layer", xticklabels=labels)
    heatmap(mlp, directory / f"mlp_out_norms_{tag}.png", title=f"MLP output L2 norm at the last token ({tag})",
            xlabel="prompt", ylabel="layer", xticklabels=labels)
    w = int(math.ceil(math.sqrt(last.size)))
    grid = np.full(w * w, np.nan)
    grid[: last.size] = last
    heatmap(grid.reshape(w, w), directory / f"last_hidden_{tag}.png", cmap="RdBu_r", center=0.0,
            title=f"last-layer hidden state, prompt 0 ({tag}; {last.size} dims folded)")
    out: dict[str, Any] = {"resid_norm": resid.mean(1).tolist(), "mlp_norm": mlp.mean(1).tolist()}
    if eager:
        n0 = int(batch["attention_mask"][0].sum())
        att = np.stack([tr.cache[f"attn.{l}.pattern"][0, :, :n0].float().cpu().numpy() for l in range(L)])  # [L,H,T]
        heatmap(att.reshape(L * H, n0), directory / f"attention_heads_{tag}.png",
                title=f"last-token attention of every head over prompt 0 ({tag})", xlabel="token",
                ylabel=f"layer*{H}+head")
        ent = -(np.clip(att, 1e-12, 1) * np.log(np.clip(att, 1e-12, 1))).sum(-1)  # [L, H]
        heatmap(ent, directory / f"attention_entropy_{tag}.png", title=f"last-token attention entropy ({tag})",
                xlabel="head", ylabel="layer")
        out["attention_entropy"] = ent.tolist()
    return out
