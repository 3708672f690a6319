"""Fair encoders on BUG over several seeds: the issue's targets as a table (mean and 95% t-interval over seeds).

Runs the packaged `recipes/fair_encoder.yaml` (or --set overrides) once per seed into
`runs/bench_fair/seed<k>` (resumable: a finished seed is read back, not re-run), then prints per
method the test macro-F1 and equalized-odds difference, the fair/plain EO ratio, the Fairlearn
comparison and the Grep-BiasIR flip rates, and writes `results/fair_encoder_seeds.json`.

    .venv/bin/python benchmarks/fair_encoder_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS, machine

from excise.config import apply_overrides, load_yaml, validate
from excise.recipes.fair_config import FairEncoderConfig
from excise.recipes.fair_encoder import run_fair
from excise.recipes.fair_report import GAP, UTILITY, methods
from excise.recipes.loader import find_recipe
from excise.measure.stats import mean_ci


def _ci(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "undefined (n=0)"
    e = mean_ci(xs)
    return f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]" if len(xs) > 1 else f"{e.value:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override of the recipe")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fair"))
    a = ap.parse_args(argv)
    data = load_yaml(find_recipe("fair_encoder.yaml"))
    data.pop("workflow"), data.pop("out")
    per_seed, seconds = {}, {}
    for seed in a.seeds:
        cfg = validate(FairEncoderConfig, apply_overrides(data, a.overrides + [f"seed={seed}"]), "recipe")
        t0, c0 = time.time(), time.process_time()
        run_fair(cfg, a.out / f"seed{seed}")
        seconds[seed] = {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
        res = methods(a.out / f"seed{seed}")
        cf = {}
        for stage, key in (("baselines", "frozen"), ("fair", "fair"), ("plain", "plain")):
            p = a.out / f"seed{seed}" / stage / "counterfactual.json"
            if p.exists():
                cf[key] = json.loads(p.read_text())["overall"]["flip_rate"]["value"]
        per_seed[seed] = {"methods": {n: {UTILITY: r[UTILITY].value, GAP: r.difference(GAP).value} for n, r in res.items()},
                          "flip_rate": cf}
        print(f"seed {seed}: {seconds[seed]}", file=sys.stderr)
    names = list(next(iter(per_seed.values()))["methods"])
    rows = [f"| method | test macro-F1 (mean, 95% CI over {len(a.seeds)} seeds) | test EO difference |", "|---|---|---|"]
    for n in names:
        rows.append(f"| {n} | {_ci([s['methods'][n][UTILITY] for s in per_seed.values()])} | "
                    f"{_ci([s['methods'][n][GAP] for s in per_seed.values()])} |")
    ratio = [s["methods"]["fair LoRA"][GAP] / s["methods"]["plain LoRA"][GAP] for s in per_seed.values()]
    df1 = [s["methods"]["fair LoRA"][UTILITY] - s["methods"]["plain LoRA"][UTILITY] for s in per_seed.values()]
    rows += ["", f"fair / plain EO ratio: {_ci(ratio)} (target <= 0.5)",
             f"fair - plain macro-F1: {_ci(df1)} (target >= -0.02)"]
    for k in ("frozen", "plain", "fair"):
        rows.append(f"Grep-BiasIR top-document flip rate, {k}: {_ci([s['flip_rate'].get(k) for s in per_seed.values()])}")
    rows.append(f"seconds per seed (wall / CPU): {seconds}")
    text = "\n".join(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fair_encoder_seeds.json").write_text(json.dumps(
        {"machine": machine(), "seeds": a.seeds, "overrides": a.overrides, "per_seed": per_seed, "seconds": seconds,
         "table": text}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
