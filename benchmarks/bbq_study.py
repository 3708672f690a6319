"""The BBQ organism study (issue 13's targets) as a table: organism build time, generalization,
localizers against the causal ground truth, the four mitigations and the relearning curves.

Runs the packaged `recipes/bbq_study.yaml` into `runs/bench_bbq_study` (resumable: a second call
only prints) and prints the study's report, then the targets, with wall and CPU seconds.

    .venv/bin/python benchmarks/bbq_study.py            # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/bbq_study.py --quick    # a smoke run of every stage
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, machine

from excise.config import load_yaml
from excise.recipes.bbq_study import run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_bbq_study")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    recipe = Path(__file__).resolve().parents[1] / "src" / "excise" / "recipes" / "bbq_study.yaml"
    settings = load_yaml(recipe)
    settings.pop("workflow")
    settings.pop("out")
    t0, c0 = time.time(), time.process_time()
    summary = run_recipe(settings, Path(args.out), quick=args.quick, source=str(recipe))
    wall, cpu = time.time() - t0, time.process_time() - c0
    print((Path(args.out) / "report" / "study.md").read_text(encoding="utf-8"))
    print("targets:", json.dumps({k: v for k, v in summary.items() if k != "report_html"}, indent=1, default=str))
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s (this call; stages that were resumed cost nothing)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bbq_study.json").write_text(json.dumps({"machine": machine(), "summary": summary, "wall_s": wall,
                                                         "cpu_s": cpu}, indent=1, default=str))


if __name__ == "__main__":
    main()
