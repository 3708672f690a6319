"""Caption gender bias on the caption organism over several seeds: the issue's targets as a table.

For each seed: build the organism (cached by config; the build time is reported from its
``organism.json``), run the packaged `recipes/caption_bias.yaml` with that seed into
`runs/bench_captions/seed<k>` (resumable), and read back:

* the organism's stereotype gap (stereotypical - counter-stereotypical gender accuracy on
  held-out visible scenes) per language, with its bootstrap CI;
* the gap after gender-swap LoRA and after the SAE latent edit, and the share of the gap removed;
* BLEU and ROUGE-L before and after (all held-out scenes and visible ones), and their changes;
* the SAE's explained variance, dead share, L0 and loss recovered;
* wall and CPU seconds of the workflow (organism cached) and of the organism build.

    .venv/bin/python benchmarks/caption_bias_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _common import RESULTS, machine

from excise.config import apply_overrides, load_yaml, validate
from excise.measure.stats import mean_ci
from excise.organisms.caption_vlm import build_caption_organism
from excise.recipes.caption_bias import run_captions
from excise.recipes.caption_config import CaptionBiasConfig
from excise.recipes.loader import find_recipe


def _read(run: Path, stage: str, name: str) -> dict | None:
    p = run / stage / f"{name}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _cell(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "n/a"
    return f"{100 * d['value']:.1f} [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]"


def _mean(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "n/a"
    e = mean_ci(xs)
    return f"{e.value:.2f} [{e.lo:.2f}, {e.hi:.2f}]" if len(xs) > 1 else f"{e.value:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override of the recipe")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_captions"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_yaml(find_recipe("caption_bias.yaml"))
    data.pop("workflow"), data.pop("out")
    rows, summary = [], {}
    for seed in a.seeds:
        cfg = validate(CaptionBiasConfig, apply_overrides(data, a.overrides + [f"seed={seed}", f"organism.seed={seed}"]),
                       "recipe")
        org = build_caption_organism(cfg.organism)
        built = json.loads((org / "organism.json").read_text())
        t0, c0 = time.time(), time.process_time()
        run_captions(cfg, a.out / f"seed{seed}")
        wall, cpu = time.time() - t0, time.process_time() - c0
        run = a.out / f"seed{seed}"
        s: dict = {"organism_seconds": built["seconds"], "organism_cpu_seconds": built["cpu_seconds"],
                   "workflow_wall": round(wall, 1), "workflow_cpu": round(cpu, 1)}
        for lang in cfg.langs:
            for stage in ("before", "lora", "sae_edit"):
                g, q, qv = _read(run, stage, f"gender_{lang}"), _read(run, stage, "quality"), _read(run, stage, "quality_visible")
                s[f"{stage}/{lang}"] = {
                    "stereotype_gap": g["differences"]["stereotype_gap"] if g else None,
                    "bias_gap": g["differences"]["bias_gap"] if g else None,
                    "hidden_gendered": g["overall"]["ambiguous_gendered_rate"] if g else None,
                    "bleu": q["by_group"][lang]["bleu"] if q else None,
                    "rouge_l": q["by_group"][lang]["rouge_l"] if q else None,
                    "bleu_visible": qv["by_group"][lang]["bleu"] if qv else None,
                    "rouge_l_visible": qv["by_group"][lang]["rouge_l"] if qv else None}
        sae = json.loads((run / "sae" / "metrics.json").read_text())
        s["sae"] = {"explained_variance": sae["metrics"]["explained_variance"], "dead_share": sae["metrics"]["dead_share"],
                    "l0": sae["metrics"]["l0"], "loss_recovered": sae["splice"]["loss_recovered"],
                    "train_seconds": sae.get("train_seconds")}
        summary[seed] = s
        for lang in cfg.langs:
            b, l_, e = s[f"before/{lang}"], s[f"lora/{lang}"], s[f"sae_edit/{lang}"]
            removed = (1 - l_["stereotype_gap"]["value"] / b["stereotype_gap"]["value"]) if b["stereotype_gap"] else math.nan
            rows.append((seed, lang, _cell(b["stereotype_gap"]), _cell(l_["stereotype_gap"]), _cell(e["stereotype_gap"]),
                         f"{100 * removed:.0f}%",
                         f"{l_['bleu']['value'] - b['bleu']['value']:+.1f} / {l_['bleu_visible']['value'] - b['bleu_visible']['value']:+.1f}",
                         f"{l_['rouge_l']['value'] - b['rouge_l']['value']:+.1f} / "
                         f"{l_['rouge_l_visible']['value'] - b['rouge_l_visible']['value']:+.1f}"))
    print("| seed | lang | gap before | gap LoRA | gap SAE edit | gap removed (LoRA) | BLEU change all / visible | "
          "ROUGE-L change all / visible |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()
    print("| seed | organism build s (CPU s) | workflow s (CPU s) | SAE EV | SAE dead | SAE L0 | loss recovered |")
    print("|---|---|---|---|---|---|---|")
    for seed, s in summary.items():
        print(f"| {seed} | {s['organism_seconds']} ({s['organism_cpu_seconds']}) | {s['workflow_wall']} "
              f"({s['workflow_cpu']}) | {s['sae']['explained_variance']:.3f} | {s['sae']['dead_share']:.1%} | "
              f"{s['sae']['l0']:.1f} | {s['sae']['loss_recovered']:.3f} |")
    print()
    for lang in data.get("langs", ["en", "ar"]):
        gaps = [summary[k][f"before/{lang}"]["stereotype_gap"]["value"] for k in summary]
        after = [summary[k][f"lora/{lang}"]["stereotype_gap"]["value"] for k in summary]
        print(f"{lang}: gap before {_mean(gaps)}, after LoRA {_mean(after)} (mean [95% t-CI] over {len(gaps)} seeds)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "caption_bias_seeds.json").write_text(json.dumps({"machine": machine(), "seeds": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
