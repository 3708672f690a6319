"""GPU smoke test of the seed-scale recipes: each recipe's quick variant on CUDA, time and peak memory per stage.

Needs a CUDA machine with the weights available (hub login or cache). Each stage's wall time and
peak GPU memory (``torch.cuda.max_memory_allocated``, reset at every stage) are printed as a table
and written to ``results/gpu_smoke.json``. `--recipes` picks a subset; `--embedded` runs the
embedded defaults instead (SmolLM2, MiniLM, the organisms), which need no download.

    python benchmarks/gpu_smoke.py --recipes seed_bbq_llama32_1b seed_fair_bge_large
    python benchmarks/gpu_smoke.py --embedded
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import RESULTS, machine

from excise.recipes.loader import run_recipe_file
from excise.run import Run

SEED = ["seed_bbq_llama32_1b", "seed_concept_qwen25_3b", "seed_fair_bge_large", "seed_captions_llava15_7b",
        "seed_undo_gemma2"]
EMBEDDED = {"bbq_debias": ["device=cuda"], "concept_unlearn": ["device=cuda"], "fair_encoder": ["device=cuda"],
            "caption_bias": ["device=cuda"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=None)
    ap.add_argument("--embedded", action="store_true", help="the embedded-default recipes on cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_smoke"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    todo = {r: ["device=cuda"] for r in (a.recipes or SEED)} if not a.embedded else EMBEDDED
    rows: list[dict] = []
    real_stage = Run.stage

    def timed_stage(self, name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        res = real_stage(self, name, fn)
        torch.cuda.synchronize()
        rows.append({"recipe": current[0], "stage": name, "skipped": res.skipped, "seconds": round(time.time() - t0, 2),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2)})
        return res

    Run.stage = timed_stage  # type: ignore[method-assign]
    current = [""]
    for recipe, sets in todo.items():
        current[0] = recipe
        try:
            run_recipe_file(recipe, out=a.out / recipe, quick=True, force=True, overrides=sets)
        except Exception as e:  # noqa: BLE001 - a smoke test reports and goes on
            rows.append({"recipe": recipe, "stage": "error", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    print("| recipe | stage | s | peak GiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['stage']} | {r.get('seconds', '')} | {r.get('peak_gib', r.get('error', ''))} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_smoke.json").write_text(json.dumps({"machine": {**machine(), "gpu": torch.cuda.get_device_name(0)},
                                                        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
