"""The main job (`make demo` / `excise demo`): the BBQ workflow on SmolLM2 and on the planted-bias model.

For each model: evaluate on held-out BBQ items, localize the heads, soft-prune them, fine-tune a
LoRA adapter on disambiguated items, re-evaluate, and print a before/after summary with 95% CIs.
The planted-bias model (``excise.organisms.planted``) is built on the first run and cached; its
true bias heads are known, so the summary also scores the localization (precision@k). Sizes are
kept small so the whole job fits in about ten minutes on a laptop-class CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from excise.intervene.lora import FinetuneConfig
from excise.io import atomic_write_json, atomic_write_text
from excise.locate.heads import HeadAttributionConfig
from excise.organisms.planted import PlantedConfig
from excise.recipes.bbq_debias import BBQDebiasConfig, run_bbq, summary_text
from excise.report.html import write_report

DEMO_CATEGORIES = ["Age", "Gender_identity", "SES", "Religion"]


def demo_config(model: str) -> Any:
    """Demo sizes. The planted model is evaluated on the categories its bias was planted in (with the
    split it is built for, which ``BBQDebiasConfig`` picks for model=planted)."""
    if model == "planted":
        p = PlantedConfig()
        extra: dict[str, Any] = {"categories": p.categories, "per_category": 32,
                                 "pairs_per_category": 12, "localize": HeadAttributionConfig(n_candidates=6)}
    else:
        extra = {"categories": DEMO_CATEGORIES, "per_category": 12, "pairs_per_category": 3,
                 "localize": HeadAttributionConfig(n_candidates=3)}
    return BBQDebiasConfig(
        model=model, finetune_per_category=12, **extra,
        finetune=FinetuneConfig(method="lora", steps=6, batch_size=8, lr=2e-3),
        trace_items=2, n_boot=1000, seed=0)


def run_demo(out: Path, *, force: bool = False, console: Any = None) -> dict:
    out = Path(out)
    t0 = time.time()
    results = {}
    for name, model in (("smollm2", "smollm2-135m-instruct"), ("planted", "planted")):
        if console is not None:
            console.rule(f"BBQ workflow: {model}")
        results[name] = run_bbq(demo_config(model), out / name, force=force, console=console)
    total = round(time.time() - t0, 1)
    text = "\n".join(summary_text(s) for s in results.values()) + f"\ntotal time: {total} s\n"
    p = results["planted"]
    if "precision_at_k" in p:
        text += (f"planted-model targets: s_AMB CI excludes 0 before: {p['s_amb_ci_excludes_0_before']}; "
                 f"s_AMB drop {p['s_amb_drop_pct']:.0f}% (target >= 75%); disambiguated accuracy change "
                 f"{p['acc_disambig_change_points']:+.1f} points (target >= -5); precision@k {p['precision_at_k']:.2f} "
                 f"(target >= 0.8)\n")
    atomic_write_json(out / "summary.json", {"results": results, "seconds": total})
    atomic_write_text(out / "summary.txt", text)
    html = write_report([out / "smollm2", out / "planted"], out / "report.html")  # both models side by side
    if console is not None:
        console.rule("before / after")
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        console.print(f"report: {html}", markup=False, highlight=False)
    return results
