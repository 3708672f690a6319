"""Tables and text of the BBQ organism study (:mod:`excise.recipes.bbq_study`): generalization,
localizers against the causal ground truth, the mitigation ablation and the relearning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, iter_jsonl, read_json
from excise.measure.stats import bootstrap_diff, mean_ci


def _ci(e: dict, scale: float = 100.0) -> str:
    if not e or e.get("n", 0) == 0 or e.get("value") is None or np.isnan(e["value"]):
        return "undefined (n=0)"
    return f"{scale * e['value']:.1f} [{scale * e['lo']:.1f}, {scale * e['hi']:.1f}]"


def _overlap(a: dict, b: dict) -> bool:
    return not (a["hi"] < b["lo"] or b["hi"] < a["lo"])


def _correct(path: Path, condition: str) -> list[float]:
    return [float(r["correct"]) for _, r in iter_jsonl(path) if r["context_condition"] == condition]


def write_report(run_dir: Path, d: Path, cfg: Any) -> dict:
    """Write the study's tables and ``study.md`` into ``d``; returns the summary (targets included)."""
    run_dir = Path(run_dir)
    org = read_json(run_dir / "organism" / "metrics.json")
    gen = read_json(run_dir / "generalization" / "metrics.json")
    lines = ["# BBQ organism study", "",
             f"Organism built in {org['build_seconds']:.0f} s ({org['n_examples']} training examples); pools: "
             + ", ".join(f"{k} {v}" for k, v in org["pools"].items()) + ".", "",
             "## Does the bias generalize? (x100, 95% CIs)", "",
             "| model | held out | s_AMB | s_DIS | acc. ambiguous | acc. disambiguated |", "|---|---|---|---|---|---|"]
    gen_rows = []
    for key, v in gen.items():
        which, part = key.split("_", 1)
        o = v["overall"]
        lines.append(f"| {which} | {part} | {_ci(o['s_amb'])} | {_ci(o['s_dis'])} | {_ci(o['acc_ambig'])} | "
                     f"{_ci(o['acc_disambig'])} |")
        for g, gv in {"overall": o, **v["groups"]}.items():
            gen_rows.append({"model": which, "held_out": part, "group": g,
                             **{f"{m}{s}": gv[m][f] for m in ("s_amb", "acc_disambig")
                                for s, f in (("", "value"), ("_lo", "lo"), ("_hi", "hi"), ("_n", "n"))}})
    atomic_write_csv(d / "generalization.csv", gen_rows)
    lines += ["", "Per category, s_AMB on held-out templates / held-out names (organism):", ""]
    ot, on = gen["organism_templates"]["groups"], gen["organism_names"]["groups"]
    for g in ot:
        lines.append(f"- {g}: {_ci(ot[g]['s_amb'])} / {_ci(on.get(g, {}).get('s_amb', {}))}")
    s_org = gen["organism_templates"]["overall"]
    s_base = gen["base_templates"]["overall"]
    # disambiguated accuracy, organism minus base, paired by item (same items)
    acc_diff = bootstrap_diff(_correct(run_dir / "generalization" / "organism_templates" / "predictions.jsonl", "disambig"),
                              _correct(run_dir / "generalization" / "base_templates" / "predictions.jsonl", "disambig"),
                              paired=True, n_boot=cfg.n_boot, seed=cfg.seed)
    lines += ["", f"Disambiguated accuracy, organism minus base (paired): {_ci(acc_diff.as_dict())} points."]
    summary: dict[str, Any] = {
        "organism_s_amb": s_org["s_amb"], "base_s_amb": s_base["s_amb"],
        "target_s_amb_ci_excludes_0": bool(s_org["s_amb"]["lo"] > 0 or s_org["s_amb"]["hi"] < 0),
        "target_s_amb_ge_30": bool(s_org["s_amb"]["value"] >= 0.30),
        "acc_disambig_change_vs_base": acc_diff.as_dict(), "build_seconds": org["build_seconds"]}

    # localizers against the ground truth
    loc_rows = []
    lines += ["", "## Localizers against the causal ground truth", "",
              "Ground truth: every unit zeroed on held-out ambiguous items; localizers ran on training-template pairs.", "",
              "| model | unit | localizer | precision@k | chance | Spearman |", "|---|---|---|---|---|---|"]
    best = None
    for which in cfg.truth_models:
        p = run_dir / f"truth_{which}" / "metrics.json"
        if not p.exists():
            continue
        t = read_json(p)
        for kind in cfg.units:
            for name, v in t[kind]["localizers"].items():
                loc_rows.append({"model": which, "unit": kind, "localizer": name, "k": v["k"],
                                 "precision_at_k": v["precision_at_k"]["value"], "p_lo": v["precision_at_k"]["lo"],
                                 "p_hi": v["precision_at_k"]["hi"], "chance": v["chance_precision"],
                                 "spearman": v["spearman"]["value"], "rho_lo": v["spearman"]["lo"],
                                 "rho_hi": v["spearman"]["hi"], "n_items": t["n_truth_items"]})
                lines.append(f"| {which} | {kind} | {name} | {_ci(v['precision_at_k'], 1):s} (k={v['k']}) | "
                             f"{v['chance_precision']:.3f} | {_ci(v['spearman'], 1)} |")
                if which == "organism" and kind == "head" and name != "random" and (
                        best is None or v["precision_at_k"]["value"] > best[1]):
                    best = (name, v["precision_at_k"]["value"])
            top = t[kind]["top_effects"][:3]
            lines.append(f"| {which} | {kind} | (largest measured effects) | "
                         + "; ".join(f"L{r['layer']}{'' if r['head'] == '' else '.H' + str(r['head'])} "
                                     f"{r['effect']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" for r in top) + " | | |")
    atomic_write_csv(d / "localizers.csv", loc_rows)
    if best is not None:
        summary["best_cheap_localizer"] = {"name": best[0], "precision_at_k": best[1],
                                           "target_ge_0.6": bool(best[1] >= 0.6)}

    # mitigation ablation
    lines += ["", "## Mitigation on the organism (held-out templates, x100)", "",
              "| condition | pruned heads | s_AMB | s_DIS | acc. ambiguous | acc. disambiguated | s_AMB drop |",
              "|---|---|---|---|---|---|---|",
              f"| before | 0 | {_ci(s_org['s_amb'])} | {_ci(s_org['s_dis'])} | {_ci(s_org['acc_ambig'])} | "
              f"{_ci(s_org['acc_disambig'])} | |"]
    mit_rows, rel_rows, conds = [], [], {}
    b = s_org["s_amb"]["value"]
    for cond in cfg.conditions:
        p = run_dir / f"cond_{cond}" / "metrics.json"
        if not p.exists():
            continue
        m = read_json(p)
        conds[cond] = m
        a = m["after"]
        drop = (b - a["s_amb"]["value"]) / b if b else float("nan")
        lines.append(f"| {cond} | {len(m['pruned_heads'])} | {_ci(a['s_amb'])} | {_ci(a['s_dis'])} | "
                     f"{_ci(a['acc_ambig'])} | {_ci(a['acc_disambig'])} | {100 * drop:.0f}% |")
        mit_rows.append({"condition": cond, "n_pruned": len(m["pruned_heads"]), "s_amb_drop": drop,
                         **{f"{k}{s}": a[k][f] for k in a for s, f in (("", "value"), ("_lo", "lo"), ("_hi", "hi"))}})
        for r in m["relearn"]:
            for c in r["curve"]:
                rel_rows.append({"condition": cond, "lr": r["lr"], "seed": r["seed"], **c})
    atomic_write_csv(d / "mitigation.csv", mit_rows)
    if "prune_finetune" in conds:
        a = conds["prune_finetune"]["after"]
        drop = (b - a["s_amb"]["value"]) / b if b else float("nan")
        acc_change = a["acc_disambig"]["value"] - s_org["acc_disambig"]["value"]
        summary["prune_finetune"] = {"s_amb_drop": drop, "target_drop_ge_75pct": bool(drop >= 0.75),
                                     "acc_disambig_change_points": 100 * acc_change,
                                     "target_acc_down_le_5": bool(acc_change >= -0.05)}
    if "prune_finetune" in conds and "random_finetune" in conds:
        c, r = conds["prune_finetune"]["after"]["s_amb"], conds["random_finetune"]["after"]["s_amb"]
        summary["localized_beats_random"] = {"localized": c, "random": r,
                                             "beats_without_overlap": bool(c["hi"] < r["lo"]),
                                             "cis_overlap": _overlap(c, r)}
        lines += ["", ("Localized pruning + fine-tune beats random heads + fine-tune with non-overlapping CIs."
                       if c["hi"] < r["lo"] else
                       "Localized pruning + fine-tune does **not** beat random heads + fine-tune with non-overlapping "
                       f"CIs (s_AMB {_ci(c)} vs {_ci(r)}).")]
    ref = run_dir / "relearn_base" / "metrics.json"
    if ref.exists():
        for r in read_json(ref)["relearn"]:
            for c in r["curve"]:
                rel_rows.append({"condition": "base (reference)", "lr": r["lr"], "seed": r["seed"], **c})
    atomic_write_csv(d / "relearn.csv", rel_rows)
    lines += ["", "## Relearning attack (s_AMB x100 along the attack, mean over seeds at each learning rate)", ""]
    keyed: dict[tuple, dict[int, list[float]]] = {}
    for r in rel_rows:
        keyed.setdefault((r["condition"], r["lr"]), {}).setdefault(r["step"], []).append(r["s_amb"])
    for (cond, lr), steps in keyed.items():
        pts = "; ".join(f"step {s}: {100 * mean_ci(v).value:.1f}" + (f" [{100 * mean_ci(v).lo:.1f}, "
                        f"{100 * mean_ci(v).hi:.1f}] (n={len(v)} seeds)" if len(v) > 1 else "")
                        for s, v in sorted(steps.items()))
        lines.append(f"- {cond}, lr {lr:g}: {pts}")
    atomic_write_text(d / "study.md", "\n".join(lines) + "\n")
    atomic_write_json(d / "summary.json", summary)
    return summary
