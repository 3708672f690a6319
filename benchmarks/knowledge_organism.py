"""Build the default knowledge organism + oracle (timed) and compare them on TOFU's metrics.

    OMP_NUM_THREADS=1 python benchmarks/knowledge_organism.py [--second-oracle-seed 1] [--threads 1] [--rehearsal 30]

Reports build wall/CPU seconds, the organism's accuracy before unlearning, and organism vs oracle
(and, with ``--second-oracle-seed``, a second oracle trained with another seed, which checks that
the KS forget quality of two equally ignorant models is large). ``--rehearsal N`` builds both
with the first N real-world rehearsal pairs mixed into training (a remedy for the world-fact
collapse; another cache entry). Writes ``benchmarks/results/knowledge_organism{_rehearsalN}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import RESULTS, machine

from excise.measure.stats import Estimate
from excise.organisms.knowledge import KnowledgeConfig, build_knowledge, evaluate_knowledge

ROWS = [("overall", "forget_quality"), ("overall", "forget_answer_prob"), ("overall", "forget_rougeL_recall"),
        ("overall", "forget_truth_ratio"), ("overall", "model_utility"), ("overall", "mia_min_k_auc"),
        ("overall", "privleak"), ("forget", "accuracy"), ("retain", "answer_prob"), ("retain", "rougeL_recall"),
        ("retain", "truth_ratio"), ("retain", "accuracy"), ("retain_shared", "accuracy"), ("retain_other", "accuracy"),
        ("world", "prob_options"), ("world", "rougeL_recall"), ("world", "truth_ratio"), ("world", "accuracy"),
        ("holdout", "answer_prob")]


def cell(e) -> str:
    if not e.defined:
        return "undefined (n=0)"
    ci = "" if e.lo != e.lo else f" [{e.lo:.3g}, {e.hi:.3g}]"
    return f"{e.value:.3g}{ci} (n={e.n})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--second-oracle-seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rehearsal", type=int, default=0, help="real-world rehearsal pairs mixed into training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = KnowledgeConfig(rehearsal=args.rehearsal)
    name = "knowledge_organism" + (f"_rehearsal{args.rehearsal}" if args.rehearsal else "")
    t0, c0 = time.time(), time.process_time()
    org = build_knowledge(cfg)
    build = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
             "organism": {k: org.info[k] for k in ("build_wall_seconds", "build_cpu_seconds", "eval_seconds", "train")},
             "oracle": {k: org.oracle_info[k] for k in ("build_wall_seconds", "build_cpu_seconds", "eval_seconds", "train")},
             "world_kept": f"{len(org.world)}/{org.info['world_candidates']}"}
    print(json.dumps(build, indent=1))
    cols = {}
    t1, c1 = time.time(), time.process_time()
    cols["organism"] = evaluate_knowledge(org.load("organism"), org)[0]
    cols["oracle"] = evaluate_knowledge(org.load("oracle"), org)[0]
    if args.second_oracle_seed is not None:
        cfg2 = cfg.model_copy(update={"seed": args.second_oracle_seed})
        org2 = build_knowledge(cfg2, organism=False)
        build["oracle_seed2"] = {k: org2.oracle_info[k] for k in ("build_wall_seconds", "build_cpu_seconds")}
        cols[f"oracle (seed {args.second_oracle_seed})"] = evaluate_knowledge(org2.load("oracle"), org)[0]
    evals = {"wall_s": round(time.time() - t1, 1), "cpu_s": round(time.process_time() - c1, 1)}
    head = "| family | metric | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for fam, m in ROWS:
        cells = [cell(r.overall[m] if fam == "overall" else r.by_group.get(fam, {}).get(m, Estimate.undefined())) for r in cols.values()]
        lines.append(f"| {fam} | {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    acc = org.info["accuracy_before_unlearning"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": machine(), "config": cfg.model_dump(mode="json"), "build": build, "eval_time": evals,
         "accuracy_before_unlearning": acc, "results": {k: r.as_dict() for k, r in cols.items()}}, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(
        f"# Knowledge organism vs oracle\n\nbuild: {json.dumps(build)}\n\neval: {json.dumps(evals)}\n\n{table}\n")


if __name__ == "__main__":
    main()
