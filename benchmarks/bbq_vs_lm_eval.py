"""BBQ log-likelihood scoring: excise vs lm-evaluation-harness on the same model and items.

Same examples (a seeded stratified sample of the packaged BBQ, ``excise.tasks.bbq.sample_bbq``),
same prompt (``excise.tasks.bbq_prompts.loglik_prompt``: "{context}\\n{question}\\nAnswer:"), same options
(" " + answer), same summed log-likelihood, argmax -> prediction. lm-eval reads the items from a
local jsonl through a custom task YAML (``include_path``; the hub is unreachable) and loads the
model from the same directory with its HFLM (``pretrained=``). Both run in this one process,
with the same thread count, and both are timed (wall clock and process CPU time, which a shared
machine's load disturbs far less) on scoring only (model loading excluded), after
each has scored ``--warmup`` items once. ``--rounds`` repeats both timings, alternating which
scorer goes first, so a change in the machine's load hits both; the medians are reported.

    .venv-bench/bin/python benchmarks/bbq_vs_lm_eval.py             # 11 categories x 19 = 209 items
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TASK_YAML = """\
task: excise_bbq_loglik
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\n{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{[ans0.strip(), ans1.strip(), ans2.strip()]}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(items, d: Path) -> Path:
    data = d / "bbq_items.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i, x in enumerate(items):
            f.write(json.dumps({"idx": i, "example_id": x.example_id, "category": x.category, "context": x.context,
                                "question": x.question, "ans0": x.answers[0], "ans1": x.answers[1],
                                "ans2": x.answers[2], "label": x.label}) + "\n")
    (d / "excise_bbq_loglik.yaml").write_text(TASK_YAML.format(data=data))
    return data


def lm_eval_runner(source: str, d: Path, batch_size: int, n: int, warmup: int):
    """lm-eval's own pipeline: HFLM + TaskManager(include_path) + simple_evaluate with logged samples.
    Returns (load seconds, a function that scores all items once and returns
    (scores [n, 3], wall s, CPU s, lm-eval's results dict))."""
    import numpy as np
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = HFLM(pretrained=source, device="cpu", dtype="float32", batch_size=batch_size)
    load_s = time.perf_counter() - t0
    tm = TaskManager(include_path=str(d), include_defaults=False)  # our task only; skips indexing ~10k YAMLs
    run = lambda **kw: simple_evaluate(  # noqa: E731
        model=lm, tasks=["excise_bbq_loglik"], task_manager=tm, log_samples=True, num_fewshot=0,
        bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, **kw)
    if warmup:
        run(limit=warmup)

    def timed():
        t0, c0 = time.perf_counter(), time.process_time()
        res = run()
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        scores = np.full((n, 3), np.nan)
        for s in res["samples"]["excise_bbq_loglik"]:
            scores[int(s["doc"]["idx"])] = [float(r[0]) for r in s["filtered_resps"]]  # (loglik, is_greedy)
        return scores, secs, cpu, res["results"]["excise_bbq_loglik"]

    return load_s, timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=19)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=8, help="items each scorer runs once before it is timed")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each scorer, alternating which goes first")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from excise.lm_packed import packed_ok
    from excise.measure.stats import wilson
    from excise.models import load
    from excise.recipes.bbq_eval import predict
    from excise.run import seed_everything
    from excise.tasks.bbq import load_bbq, sample_bbq

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    items = sample_bbq(load_bbq(), args.per_category, seed=args.seed)
    n = len(items)
    print(f"{n} BBQ items ({args.per_category} per category, stratified by context x polarity)", flush=True)

    t0 = time.perf_counter()
    h = load("smollm2-135m-instruct")
    ex_load = time.perf_counter() - t0
    path = "packed" if packed_ok(h.model) else "kv-cache"
    if args.warmup:
        predict(h, items[: args.warmup], "loglik", batch_size=args.batch_size)

    def excise_timed():
        t0, c0 = time.perf_counter(), time.process_time()
        rows = predict(h, items, "loglik", batch_size=args.batch_size)
        return rows, time.perf_counter() - t0, time.process_time() - c0

    loads = [_common.machine()["loadavg_1_5_15"]]
    with tempfile.TemporaryDirectory() as d:
        write_task(items, Path(d))
        le_load, le_timed = lm_eval_runner(h.source, Path(d), args.batch_size, n, args.warmup)
        ex_runs, le_runs = [], []
        for r in range(args.rounds):
            for who in (("excise", "lm-eval") if r % 2 == 0 else ("lm-eval", "excise")):
                if who == "excise":
                    ex_runs.append(excise_timed())
                    print(f"round {r}: excise {ex_runs[-1][1]:.1f} s wall, {ex_runs[-1][2]:.1f} s CPU", flush=True)
                else:
                    le_runs.append(le_timed())
                    print(f"round {r}: lm-eval {le_runs[-1][1]:.1f} s wall, {le_runs[-1][2]:.1f} s CPU", flush=True)
            loads.append(_common.machine()["loadavg_1_5_15"])
    rows = ex_runs[0][0]
    ex_s, ex_cpu = statistics.median(x[1] for x in ex_runs), statistics.median(x[2] for x in ex_runs)
    le_scores, le_res = le_runs[0][0], le_runs[0][3]
    le_s, le_cpu = statistics.median(x[1] for x in le_runs), statistics.median(x[2] for x in le_runs)
    ex_scores = np.array([r["scores"] for r in rows])
    ex_pred = np.array([r["pred"] for r in rows])
    if np.isnan(le_scores).any():
        raise SystemExit("lm-eval returned no scores for some items")
    le_pred = le_scores.argmax(1)
    labels = np.array([x.label for x in items])

    agree = wilson(int((ex_pred == le_pred).sum()), n)
    ex_acc = wilson(int((ex_pred == labels).sum()), n)
    le_acc = wilson(int((le_pred == labels).sum()), n)
    diff = np.abs(ex_scores - le_scores)
    speed, speed_cpu = le_s / ex_s, le_cpu / ex_cpu
    fmt = lambda e: f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]"  # noqa: E731
    rows_t = [
        [f"excise (lm.loglikelihood, {path})", f"{ex_s:.1f}", f"{ex_cpu:.1f}", f"{n / ex_s:.2f}", fmt(ex_acc), f"{ex_load:.1f}"],
        ["lm-eval (HFLM, multiple_choice)", f"{le_s:.1f}", f"{le_cpu:.1f}", f"{n / le_s:.2f}", fmt(le_acc),
         f"{le_load:.1f}"],
    ]
    header = ["scorer", "scoring wall s", "scoring CPU s", "items/s (wall)", f"accuracy (95% CI, n={n})",
              "model load s"]
    tab = _common.table(rows_t, header)
    mach = _common.machine()
    print()
    print(tab)
    print(f"\nprediction agreement: {fmt(agree)}; speed-up lm-eval / excise: {speed:.2f}x wall, {speed_cpu:.2f}x CPU time")
    print(f"per-option log-likelihood |excise - lm-eval|: max {diff.max():.2e}, median {np.median(diff):.2e}")
    print(f"medians of {args.rounds} round(s); CPU-time speed-up per round: "
          + ", ".join(f"{le[2] / ex[2]:.2f}x" for ex, le in zip(ex_runs, le_runs)))
    print(f"load average (1, 5, 15 min) at start and after each round: {loads} on {mach['cores']} cores, "
          f"torch threads {args.threads}")
    disagree = [{"example_id": items[i].example_id, "category": items[i].category, "excise": ex_scores[i].tolist(),
                 "lm_eval": le_scores[i].tolist()} for i in np.nonzero(ex_pred != le_pred)[0]]
    _common.save(f"bbq_vs_lm_eval_{n}", {
        "args": vars(args), "machine": mach, "n": n, "agreement": agree.as_dict(), "speedup_wall": speed, "speedup_cpu": speed_cpu,
        "loadavg_per_round": loads, "loglik_path": path,
        "excise": {"seconds": ex_s, "cpu_seconds": ex_cpu, "load_s": ex_load, "accuracy": ex_acc.as_dict(),
                   "rounds_wall_cpu": [[x[1], x[2]] for x in ex_runs]},
        "lm_eval": {"seconds": le_s, "cpu_seconds": le_cpu, "load_s": le_load, "accuracy": le_acc.as_dict(),
                    "acc_reported": le_res.get("acc,none"), "rounds_wall_cpu": [[x[1], x[2]] for x in le_runs]},
        "loglik_abs_diff": {"max": float(diff.max()), "median": float(np.median(diff))},
        "disagreements": disagree, "table": tab,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
