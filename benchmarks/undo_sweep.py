"""UNDO's compute-robustness trade-off (issue 15): relearning robustness vs distillation compute.

Per seed: the base and the oracle (pretrained without mul/div, cached), the unlearned teacher
(the recipe's ``undo_from`` method, MaxEnt), and for every variant -- global noise at each alpha
(beta 0.1, as the paper), each targeted mask (parameter difference, SNMF, Fisher) at each mask
size -- the noised teacher distilled back (forward KL to the teacher's logits on the mixed stream,
cosine lr over the whole budget, no early stop) for up to 100% of the sequences the base saw in
pretraining, with checkpoints at fixed fractions. At every checkpoint: forget and retain accuracy
on the test pool, and the relearning attack (forget-only data, worst case over a learning-rate
sweep, held-out forget items) as an AUC and steps to 50%. Reference rows: base, oracle, teacher.

Every finished point is kept (``<out>/points``, excise.resume.Points) and a re-run skips it: a
killed sweep resumes; a variant with a missing point is distilled again from its start (same seed,
same bytes) and only its missing points are measured. Outputs in ``<out>``: ``sweep.json``,
``sweep.csv`` (mean over seeds with t-intervals), ``table.md`` (the compute at which each variant
first reaches retain >= 90% of the base and a relearning AUC within the oracle's CI) and
``tradeoff.png``. Compute is reported as a fraction of the base's pretraining sequences, and as
student (6 N tokens) and teacher (2 N tokens) FLOPs.

    .venv/bin/python benchmarks/undo_sweep.py --out runs/undo_sweep          # 3 seeds, every variant
    .venv/bin/python benchmarks/undo_sweep.py --quick --out runs/undo_quick  # CI scale, minutes
    .venv/bin/python benchmarks/undo_sweep.py --report-only --seeds 0 --out runs/undo_sweep  # what is done so far
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)


def settings(args) -> dict:
    """The sweep's settings (the recipe's defaults; --quick shrinks everything)."""
    from excise.attack.relearn_arithmetic import RelearnConfig, log_lrs
    from excise.intervene.undo import DistillConfig
    from excise.recipes.robust_config import RobustUnlearnConfig, TargetedConfig

    cfg = RobustUnlearnConfig()
    pre = cfg.pretrain
    relearn = RelearnConfig(lrs=log_lrs(1e-3, 1e-2, 4), steps=200, eval_every=25, eval_n_per_op=50)
    distill = DistillConfig(eval_n_per_op=50)
    eval_n = cfg.eval_n_per_op
    if args.quick:
        pre = _common.quick_arith_pretrain()
        cfg = cfg.model_copy(update={"methods": {k: v.model_copy(update={"steps": 5}) for k, v in cfg.methods.items()},
                                     "localize_n": 16})
        relearn = RelearnConfig(lrs=[3e-3], steps=10, eval_every=5, eval_n_per_op=10, n_items=32)
        distill = DistillConfig(batch_size=32, warmup=2, eval_n_per_op=10)
        eval_n = 10
    targeted = [TargetedConfig(localizer=loc, alpha=args.targeted_alpha, top_p=p)
                for loc in args.localizers for p in args.top_ps]
    return {"recipe": cfg, "pretrain": pre, "relearn": relearn, "distill": distill, "eval_n": eval_n,
            "targeted": targeted}


def build_masks(s: dict, base, teacher, tok, data, seed: int) -> dict:
    """name -> (alpha, parameter mask or None) of every variant."""
    from excise.locate.fisher import fisher_scores
    from excise.locate.paramdiff import param_diff_scores, param_masks
    from excise.locate.snmf import neuron_param_masks, snmf_scores
    from excise.select import SelectConfig, select

    cfg = s["recipe"]
    out = {f"global-a{a:g}": (a, None) for a in s["alphas"]}
    f_items = data.train("forget", cfg.localize_n, 20_000 + seed)
    r_items = data.train("retain", cfg.localize_n, 30_000 + seed)
    for t in s["targeted"]:
        if t.localizer == "paramdiff":
            mask = param_masks(param_diff_scores(base.model, teacher.model), top_p=t.top_p, mode=t.mode)
        elif t.localizer == "fisher":
            mask = param_masks(fisher_scores(copy.deepcopy(base.model), tok, f_items, loss_on="answer"),
                               top_p=t.top_p, mode=t.mode)
        else:
            sc = snmf_scores(base, tok, f_items, r_items, cfg.snmf.model_copy(update={"seed": seed}))
            k = max(1, int(round(t.top_p * base.anatomy.d_mlp)))
            mask = neuron_param_masks(base.model, select(sc, SelectConfig(method="topk", k=k, per_layer=True)).values)
        out[f"{t.localizer}-p{t.top_p:g}-a{t.alpha:g}"] = (t.alpha, mask)
    return out


def run_seed(s: dict, args, seed: int, pts, say) -> None:
    """Every point of one seed (skipping those already kept)."""
    from excise.attack.relearn_arithmetic import relearn
    from excise.intervene.undo import NoiseConfig, apply_noise, distill
    from excise.intervene.unlearn_methods import unlearn
    from excise.io import read_json
    from excise.organisms.arithmetic import pretrain
    from excise.recipes.robust_unlearn import Data, _load, _save, evaluate
    from excise.run import seed_everything
    from excise.tasks.arithmetic import FORGET_OPS, RETAIN_OPS

    cfg, data = s["recipe"], Data(s["recipe"])
    base_dir = pretrain(s["pretrain"], name="base")
    oracle_dir = pretrain(s["pretrain"].model_copy(update={"ops": list(RETAIN_OPS)}), name="oracle")
    info = read_json(base_dir / "pretrain.json")
    budget = info["steps_run"] * info["config"]["batch_size"]  # sequences of the base's pretraining
    base = _load(base_dir)
    tok = base.tokenizer
    ev = data.eval(s["eval_n"])
    rc = s["relearn"].model_copy(update={"seed": seed})
    r_eval = data.eval(rc.eval_n_per_op, seed=2000 + seed, ops=FORGET_OPS)

    def measure(model) -> dict:
        acc = evaluate(model, tok, ev)
        rl = relearn(model, tok, rc, eval_items=r_eval)
        return {"forget": acc["forget"]["value"], "retain": acc["retain"]["value"], "auc": rl["auc"],
                "steps_to_50": rl["steps_to_50"], "worst_lr": rl["worst_lr"]}

    for name, p in (("base", base_dir), ("oracle", oracle_dir)):
        pts.cached(f"s{seed}.{name}", lambda p=p: measure(_load(p).model))
    mc = cfg.methods[cfg.undo_from].model_copy(update={"seed": seed})

    def make_teacher(d: Path) -> None:
        seed_everything(seed)
        m = copy.deepcopy(base.model)
        unlearn(m, tok, data.stream("forget", seed), data.stream("retain", seed + 1), mc)
        _save(m, tok, d)

    teacher = _load(pts.folder(f"s{seed}-teacher", make_teacher))
    pts.cached(f"s{seed}.teacher", lambda: measure(teacher.model))
    n_params = sum(p.numel() for p in teacher.model.parameters())
    dcfg = s["distill"]
    steps_full = max(1, math.ceil(budget / dcfg.batch_size))
    at = {f: max(1, round(f * steps_full)) for f in args.fractions}
    for name, (alpha, mask) in build_masks(s, base, teacher, tok, data, seed).items():
        keys = {f: f"s{seed}.{name}@{f:g}" for f in args.fractions}
        if all(pts.get(k) is not None for k in keys.values()):
            continue
        t0 = time.process_time()
        seed_everything(seed)
        student = copy.deepcopy(teacher.model)
        noise = apply_noise(student, NoiseConfig(alpha=alpha, beta=s["beta"], seed=seed), mask)
        pts.cached(f"s{seed}.{name}@0", lambda: {**measure(student), "noise": noise})
        def checkpoint(f: float):
            def cb(m, tok_seen: int) -> None:
                pts.cached(keys[f], lambda: {**measure(m), "step": at[f], "sequences": at[f] * dcfg.batch_size,
                                             "tokens": tok_seen, "student_flops": 6.0 * n_params * tok_seen,
                                             "teacher_flops": 2.0 * n_params * tok_seen})
            return cb

        distill(student, teacher.model, tok, data.stream("mixed", 40_000 + seed),
                dcfg.model_copy(update={"max_steps": max(at.values()), "seed": seed, "eval_every": 10 ** 9}),
                at_steps={at[f]: checkpoint(f) for f in args.fractions})
        say(f"seed {seed} {name}: {max(at.values())} distillation steps, {time.process_time() - t0:.0f} CPU s")


def summarize(pts, args, seeds: list[int], variants: list[str]) -> tuple[list[dict], dict]:
    """Mean over seeds (t-interval) per (variant, fraction); the reference rows."""
    from excise.measure.stats import mean_ci

    def agg(keys: list[str]) -> dict:
        rows = [pts.get(k) for k in keys]
        rows = [r for r in rows if r is not None]
        return {m: mean_ci([r[m] for r in rows]).as_dict() for m in ("forget", "retain", "auc")} | {"n_seeds": len(rows)}

    refs = {name: agg([f"s{sd}.{name}" for sd in seeds]) for name in ("base", "oracle", "teacher")}
    rows = []
    for v in variants:
        for f in [0.0, *args.fractions]:
            rows.append({"variant": v, "fraction": f, **agg([f"s{sd}.{v}@{f:g}" for sd in seeds])})
    return rows, refs


def paired(pts, args, a: str, b: str) -> list[dict]:
    """Per fraction: mean over seeds of (a - b) in forget, retain and AUC, t-interval, for the seeds with both
    points -- the same seed shares base, teacher, data order and attack, so pairing removes that variance."""
    from excise.measure.stats import mean_ci

    rows = []
    for f in [0.0, *args.fractions]:
        both = [(x, y) for sd in args.seeds
                if (x := pts.get(f"s{sd}.{a}@{f:g}")) is not None and (y := pts.get(f"s{sd}.{b}@{f:g}")) is not None]
        if both:
            rows.append({"fraction": f, "n_seeds": len(both),
                         **{m: mean_ci([x[m] - y[m] for x, y in both]).as_dict() for m in ("forget", "retain", "auc")}})
    return rows


def paired_md(rows: list[dict], a: str, b: str) -> str:
    if not rows:
        return f"Paired {a} - {b}: no seed has both yet."
    fmt = lambda e: (f"{e['value']:+.3f}" + ("" if e["lo"] is None or math.isnan(e["lo"])  # noqa: E731
                                              else f" [{e['lo']:+.3f}, {e['hi']:+.3f}]"))
    body = [[f"{100 * r['fraction']:g}%", r["n_seeds"], fmt(r["retain"]), fmt(r["auc"]), fmt(r["forget"])] for r in rows]
    return (f"Paired difference {a} minus {b} (same seed; mean and 95% t-interval over seeds):\n\n"
            + _common.table(body, ["compute", "seeds", "retain", "relearning AUC", "forget"]))


def compute_line(pts, args, variants: list[str]) -> str:
    """What 100% of the compute is: sequences, tokens, student and teacher FLOPs (from a finished last point)."""
    last = max(args.fractions)
    row = next((r for sd in args.seeds for v in variants if (r := pts.get(f"s{sd}.{v}@{last:g}")) is not None), None)
    if row is None:
        return f"Compute at {100 * last:g}%: not measured yet."
    return (f"Compute at {100 * last:g}% (per variant and seed): {row['step']} distillation steps, {row['sequences']:,} "
            f"sequences, {row['tokens']:,} tokens; student {row['student_flops']:.3g} FLOPs (6 N tokens, training), "
            f"teacher {row['teacher_flops']:.3g} FLOPs (2 N tokens, forward only).")


def first_reaching(rows: list[dict], refs: dict, variant: str) -> tuple[str, str]:
    """(compute of retain >= 90% of the base, compute of AUC within the oracle's CI), or 'never'."""
    base_retain = refs["base"]["retain"]["value"]
    hi = refs["oracle"]["auc"]["hi"]
    if hi is None or math.isnan(hi):
        hi = refs["oracle"]["auc"]["value"]
    mine = [r for r in rows if r["variant"] == variant and r["n_seeds"]]
    if not mine:
        return "not measured yet", "not measured yet"
    ret = next((r["fraction"] for r in mine if r["retain"]["value"] >= 0.9 * base_retain), None)
    rob = next((r["fraction"] for r in mine if r["auc"]["value"] <= hi and r["retain"]["value"] >= 0.9 * base_retain),
               None)
    fmt = lambda f: f"{100 * f:g}%" if f is not None else f"never within {100 * max(r['fraction'] for r in mine):g}%"  # noqa: E731
    return fmt(ret), fmt(rob)


def figure(rows: list[dict], refs: dict, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "auc", "relearning AUC (lower = more robust)"),
                              (axes[1], "retain", "retain accuracy")):
        for v in variants:
            r = [x for x in rows if x["variant"] == v and x["n_seeds"]]
            xs = [100 * x["fraction"] for x in r]
            ys = [x[metric]["value"] for x in r]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=v, ls="-" if v.startswith("global") else "--")
            lo = [x[metric]["lo"] for x in r]
            hi = [x[metric]["hi"] for x in r]
            if all(a is not None and not math.isnan(a) for a in lo + hi):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        o = refs["oracle"][metric]
        ax.axhline(o["value"], color="k", lw=1.5, label="oracle")
        if o["lo"] is not None and not math.isnan(o["lo"]):
            ax.axhspan(o["lo"], o["hi"], color="k", alpha=0.08)
        ax.set_xlabel("distillation compute (% of the base's pretraining sequences)")
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(old: dict, args, refs: dict, variants: list[str], rows: list[dict], points: dict,
          pair_rows: list[dict]) -> tuple[list[str], list[dict], dict, list[dict]]:
    """This run's rows joined with an earlier sweep's rows of the variants it did not measure.

    Sound only when both runs measured the same references: same seeds, and base, oracle and
    teacher rows equal to 1e-9 (same seed, same bytes, so they should be identical)."""
    from excise.errors import ExciseError

    if sorted(old["args"]["seeds"]) != sorted(args.seeds) or list(old["args"]["fractions"]) != list(args.fractions):
        raise ExciseError(f"--merge-with: {args.merge_with} has seeds {old['args']['seeds']} and fractions "
                          f"{old['args']['fractions']}; this run has {args.seeds} and {args.fractions}")
    for name, ref in refs.items():
        for m in ("forget", "retain", "auc"):
            a, b = ref[m]["value"], old["references"][name][m]["value"]
            if a is None or b is None or abs(a - b) > 1e-9:
                raise ExciseError(f"--merge-with: the {name}'s {m} differs ({b} there, {a} here); the runs do not "
                                  "reproduce each other, so their rows cannot be merged")
    order = list(dict.fromkeys([r["variant"] for r in old["rows"]] + variants))
    merged = [r for v in order for r in (rows if v in variants else old["rows"]) if r["variant"] == v]
    if not pair_rows and [old["paired"]["a"], old["paired"]["b"]] == list(args.pair):
        pair_rows = old["paired"]["rows"]
    return order, merged, {**old.get("points", {}), **points}, pair_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/undo_sweep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8],
                    help="global-noise alphas (none: targeted variants only)")
    ap.add_argument("--localizers", nargs="+", default=["paramdiff", "snmf", "fisher"])
    ap.add_argument("--top-ps", type=float, nargs="+", default=[0.1, 0.3], help="targeted mask sizes")
    ap.add_argument("--targeted-alpha", type=float, default=0.8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pair", nargs=2, default=["fisher-p0.3-a0.8", "global-a0.6"], metavar=("A", "B"),
                    help="two variants compared seed by seed (default: the pair seed 0 of the 2026-12-01 run singled out)")
    ap.add_argument("--quick", action="store_true", help="one seed, one alpha, paramdiff only, a tiny base (CI)")
    ap.add_argument("--report-only", action="store_true",
                    help="summarize the points already kept (of --seeds) without computing any (a sweep still running)")
    ap.add_argument("--merge-with", type=Path, default=None, metavar="SWEEP_JSON",
                    help="an earlier sweep.json of the same seeds: its variants this run does not measure join the "
                         "report, if its base, oracle and teacher rows equal this run's (the runs reproduce each other)")
    args = ap.parse_args(argv)
    import torch

    from excise.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
    from excise.resume import Points

    if args.quick:
        args.seeds, args.alphas, args.localizers, args.top_ps, args.fractions = [0], [0.8], ["paramdiff"], [0.1], [0.5, 1.0]
        args.pair = ["paramdiff-p0.1-a0.8", "global-a0.8"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    s = settings(args) | {"alphas": args.alphas, "beta": args.beta}
    pts = Points(out / "points")
    t0, c0 = time.time(), time.process_time()
    for seed in [] if args.report_only else args.seeds:
        run_seed(s, args, seed, pts, lambda m: print(m, flush=True))
    variants = [f"global-a{a:g}" for a in args.alphas] + [f"{t.localizer}-p{t.top_p:g}-a{t.alpha:g}" for t in s["targeted"]]
    rows, refs = summarize(pts, args, args.seeds, variants)
    points = {k: v for sd in args.seeds for k in [f"s{sd}.{n}" for n in ("base", "oracle", "teacher")]
              + [f"s{sd}.{v}@{f:g}" for v in variants for f in [0.0, *args.fractions]] if (v := pts.get(k)) is not None}
    pair_rows = paired(pts, args, *args.pair)
    if args.merge_with is not None:
        variants, rows, points, pair_rows = merge(read_json(args.merge_with), args, refs, variants, rows, points,
                                                  pair_rows)
    table = [[v, *first_reaching(rows, refs, v)] for v in variants]
    done = {r["variant"]: max((x["fraction"] for x in rows if x["variant"] == r["variant"] and x["n_seeds"]), default=None)
            for r in rows}
    table = [row + [f"{100 * done[row[0]]:g}%" if done[row[0]] is not None else "-"] for row in table]
    header = ["variant", "retain >= 90% of base at", "relearning AUC within the oracle's CI (and retain) at",
              "measured up to"]
    ref_line = "; ".join(f"{k}: forget {r['forget']['value']:.3f}, retain {r['retain']['value']:.3f}, "
                         f"AUC {r['auc']['value']:.3f}" for k, r in refs.items())
    md = (f"UNDO compute sweep, seeds {args.seeds}, fractions {args.fractions} of the base's pretraining sequences.\n\n"
          f"References (mean over seeds): {ref_line}.\n\n{compute_line(pts, args, variants)}\n\n"
          + _common.table(table, header) + "\n\n" + paired_md(pair_rows, *args.pair) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", md)
    atomic_write_csv(out / "sweep.csv", [{"variant": r["variant"], "fraction": r["fraction"], "n_seeds": r["n_seeds"],
                                          **{f"{m}_{k}": r[m][k] for m in ("forget", "retain", "auc")
                                             for k in ("value", "lo", "hi")}} for r in rows])
    figure(rows, refs, variants, out / "tradeoff.png")
    wall, cpu = time.time() - t0, time.process_time() - c0
    atomic_write_json(out / "sweep.json", {"args": {**vars(args), "merge_with": args.merge_with and str(args.merge_with)}, "machine": _common.machine(), "references": refs,
                                           "rows": rows, "table": table, "paired": {"a": args.pair[0], "b": args.pair[1], "rows": pair_rows}, "wall_seconds": round(wall, 1),
                                           "cpu_seconds": round(cpu, 1), "points": points})
    print(md + f"\n{wall:.0f} s wall, {cpu:.0f} s CPU (this invocation; finished points are not re-run)")
    return 0


if __name__ == "__main__":
    _common.run_main(main)
