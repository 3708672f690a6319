"""The main job (`make demo` / `excise demo`): the BBQ workflow on SmolLM2 and on the biased organism.

For each model: evaluate on held-out BBQ items, localize the heads, soft-prune them, fine-tune a
LoRA adapter, re-evaluate, and print a before/after summary with 95% CIs. SmolLM2 itself carries
no measurable bias; the biased organism (``excise.organisms.biased_bbq``: SmolLM2 taught the
stereotyped answer on ambiguous items of training templates) is built on the first run and cached,
and is evaluated on templates it never saw. Sizes are kept small so the whole job, organism build
included, fits in about ten minutes on a laptop-class CPU. The full study (every head ablated,
localizers scored, four mitigations, relearning) is ``excise run recipes/bbq_study.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from excise.intervene.lora import FinetuneConfig
from excise.io import atomic_write_json, atomic_write_text
from excise.locate.heads import HeadAttributionConfig
from excise.organisms.biased_bbq import BiasedConfig
from excise.recipes.bbq_debias import BBQDebiasConfig, run_bbq, summary_text
from excise.report.html import write_report

DEMO_CATEGORIES = ["Age", "Gender_identity", "SES", "Religion"]


def demo_config(model: str) -> Any:
    """Demo sizes. The organism is evaluated on its own categories and held-out templates; its
    fine-tune teaches both conditions (ambiguous -> "unknown", disambiguated -> the answer)."""
    if model == "biased":
        extra: dict[str, Any] = {"categories": BiasedConfig().categories, "per_category": 32, "pairs_per_category": 6,
                                 "finetune_on": "both", "finetune_per_category": 24,
                                 "localize": HeadAttributionConfig(n_candidates=6)}
        ft = FinetuneConfig(method="lora", steps=16, batch_size=8, lr=1e-3)
    else:
        extra = {"categories": DEMO_CATEGORIES, "per_category": 12, "pairs_per_category": 3, "finetune_per_category": 12,
                 "localize": HeadAttributionConfig(n_candidates=3)}
        ft = FinetuneConfig(method="lora", steps=6, batch_size=8, lr=2e-3)
    return BBQDebiasConfig(model=model, **extra, finetune=ft, trace_items=2, n_boot=1000, seed=0)


def run_demo(out: Path, *, force: bool = False, console: Any = None) -> dict:
    out = Path(out)
    t0 = time.time()
    results = {}
    for name, model in (("smollm2", "smollm2-135m-instruct"), ("biased", "biased")):
        if console is not None:
            console.rule(f"BBQ workflow: {model}")
        results[name] = run_bbq(demo_config(model), out / name, force=force, console=console)
    total = round(time.time() - t0, 1)
    text = "\n".join(summary_text(s) for s in results.values()) + f"\ntotal time: {total} s\n"
    b = results["biased"]
    if "s_amb_drop_pct" in b:
        text += (f"biased organism (held-out templates): s_AMB CI excludes 0 before: {b['s_amb_ci_excludes_0_before']}; "
                 f"s_AMB drop {b['s_amb_drop_pct']:.0f}% (target >= 75%); disambiguated accuracy change "
                 f"{b['acc_disambig_change_points']:+.1f} points (target >= -5)\n")
    atomic_write_json(out / "summary.json", {"results": results, "seconds": total})
    atomic_write_text(out / "summary.txt", text)
    html = write_report([out / "smollm2", out / "biased"], out / "report.html")  # both models side by side
    if console is not None:
        console.rule("before / after")
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        console.print(f"report: {html}", markup=False, highlight=False)
    return results
