"""Re-tune the UNDO workflow's unlearning methods on the dev pool (issue 15: the old defaults were tuned on test items).

For each method (GradAscent, GradDiff, MaxEnt, NPO, RMU) a grid of learning rates x steps is run
from the default base (seed 0) and scored on the **dev pool** only (``excise.tasks.arithmetic.POOLS``;
the test pool, which every reported number uses, is never looked at). Rule, fixed before running:
among settings that keep dev retain accuracy >= 95% of the base's, the lowest dev forget accuracy
wins; ties go to fewer steps, then to the lower learning rate. Prints a table per method, the pick,
and the current default beside it; writes ``benchmarks/results/undo_tune.{md,json}``.

    .venv/bin/python benchmarks/undo_tune.py [--methods maxent npo] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)

GRID = {  # (learning rates, step counts) per method, around the old defaults
    "grad_ascent": ([1e-4, 2e-4, 5e-4], [10, 20, 40]),
    "grad_diff": ([1e-4, 3e-4, 1e-3], [20, 40, 80]),
    "maxent": ([2e-4, 5e-4, 1e-3], [30, 60, 120]),
    "npo": ([2e-4, 5e-4, 1e-3], [30, 60, 120]),
    "rmu": ([1e-3, 5e-3, 1e-2], [40, 80, 160]),
}
RETAIN_KEEP = 0.90  # the sweep's own retain bar (issue 15: retain >= 90% of the base)


def pick(rows: list[dict], base_retain: float) -> dict | None:
    """The rule above: lowest dev forget among settings keeping retain; ties -> fewer steps, lower lr."""
    ok = [r for r in rows if r["retain"] >= RETAIN_KEEP * base_retain]
    return min(ok, key=lambda r: (r["forget"], r["steps"], r["lr"])) if ok else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--eval-n", type=int, default=50, help="dev-pool items per operation")
    ap.add_argument("--quick", action="store_true", help="a tiny base and one setting per method (tests)")
    ap.add_argument("--out", default=str(_common.RESULTS / "undo_tune"))
    args = ap.parse_args(argv)
    import torch

    from excise.intervene.unlearn_methods import unlearn
    from excise.io import atomic_write_json, atomic_write_text
    from excise.organisms.arithmetic import pretrain
    from excise.recipes.robust_config import RobustUnlearnConfig
    from excise.recipes.robust_unlearn import Data, _load, evaluate
    from excise.run import seed_everything

    torch.set_num_threads(1)
    cfg = RobustUnlearnConfig()
    pre, grid, eval_n = cfg.pretrain, GRID, args.eval_n
    if args.quick:
        pre = _common.quick_arith_pretrain()
        grid = {m: ([g[0][1]], [5]) for m, g in GRID.items()}
        eval_n = 10
    base = _load(pretrain(pre, name="base"))
    tok, data = base.tokenizer, Data(cfg)
    dev = data.eval(eval_n, pool="dev")
    acc0 = evaluate(base.model, tok, dev)
    base_row = {"forget": acc0["forget"]["value"], "retain": acc0["retain"]["value"]}
    t0, c0 = time.time(), time.process_time()
    out: dict = {"base_dev": base_row, "rule": f"dev retain >= {RETAIN_KEEP} x base; lowest dev forget; "
                                                  "ties: fewer steps, lower lr", "methods": {}}
    lines = [f"Dev-pool tuning of the unlearning methods (seed 0, {len(dev)} dev items; base: forget "
             f"{base_row['forget']:.3f}, retain {base_row['retain']:.3f}). Rule: {out['rule']}.", ""]
    for method in args.methods:
        lrs, steps = grid[method]
        default = cfg.methods[method]
        rows = []
        for lr in lrs:
            for n in steps:
                seed_everything(0)
                m = copy.deepcopy(base.model)
                mc = default.model_copy(update={"lr": lr, "steps": n, "seed": 0})
                unlearn(m, tok, data.stream("forget", 0), data.stream("retain", 1), mc)
                acc = evaluate(m, tok, dev)
                rows.append({"lr": lr, "steps": n, "forget": acc["forget"]["value"], "retain": acc["retain"]["value"]})
                print(f"{method} lr {lr:g} steps {n}: dev forget {rows[-1]['forget']:.3f} retain "
                      f"{rows[-1]['retain']:.3f}", flush=True)
        best = pick(rows, base_row["retain"])
        out["methods"][method] = {"rows": rows, "pick": best, "default": {"lr": default.lr, "steps": default.steps}}
        cell = lambda r: f"lr {r['lr']:g}, {r['steps']} steps" if r else "none keeps retain"  # noqa: E731
        agrees = best is not None and (best["lr"], best["steps"]) == (default.lr, default.steps)
        lines += [f"## {method}: pick {cell(best)} (default: {cell(out['methods'][method]['default'])}"
                  f"{', same' if agrees else ''})", "",
                  _common.table([[f"{r['lr']:g}", r["steps"], f"{r['forget']:.3f}", f"{r['retain']:.3f}",
                                  "pick" if r is best else ""] for r in rows],
                                ["lr", "steps", "dev forget", "dev retain", ""]), ""]
    out["wall_seconds"], out["cpu_seconds"] = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
    out["machine"] = _common.machine()
    lines.append(f"{out['wall_seconds']:.0f} s wall, {out['cpu_seconds']:.0f} s CPU.")
    md = "\n".join(lines) + "\n"
    dest = Path(args.out)
    atomic_write_text(dest.with_suffix(".md"), md)
    atomic_write_json(dest.with_suffix(".json"), out)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
