"""How well does the planted-bias model's implant live in its planted heads?

For one planted configuration (the shipped default, or a variant given on the command line) this
prints, on ambiguous BBQ items of the train split the implant never saw and of the held-out split:

* the implant's shift of the biased-answer log-odds against the base model (mean with 95% CI,
  per-item SD, share of items shifted towards the biased answer);
* for every planted head, the drop of the biased log-odds when that head alone is ablated
  (scale 0) in the planted model, with a 95% CI -- the quantity the localizer ranks heads by;
* the same shift with all planted heads soft-pruned (x0.2), what mitigation starts from.

A head that carries the implant shows a drop well above 0 whose CI excludes 0 on both splits.

    .venv/bin/python benchmarks/planted_implant.py                      # the shipped default
    .venv/bin/python benchmarks/planted_implant.py --independent --steps 60 --n-train 240  # one run per head
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: PlantedConfig's)")
    ap.add_argument("--n-train", type=int, default=None, help="ambiguous train items per category")
    ap.add_argument("--independent", action="store_true", help="plant each head in its own run (default: one joint run)")
    ap.add_argument("--n", type=int, default=24, help="ambiguous items per category and split")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from excise.intervene.heads import HeadScales, scale_heads
    from excise.locate.heads import mean_logodds
    from excise.measure.stats import mean_ci
    from excise.models import load
    from excise.tasks.bbq import split_items
    from excise.organisms.planted import PlantedConfig, build_planted, train_items
    from excise.tasks.bbq import load_bbq, sample_bbq

    update = {k: v for k, v in (("steps", args.steps), ("n_train", args.n_train)) if v is not None}
    if args.independent:
        update["independent"] = True
    cfg = PlantedConfig().model_copy(update=update)
    t0 = time.time()
    directory = build_planted(cfg)
    build_s = time.time() - t0
    heads = [tuple(h) for h in cfg.heads]
    items = [x for x in load_bbq(cfg.categories) if x.target_loc is not None]
    train, held = split_items(items, cfg.eval_fraction, cfg.seed, cfg.split_by)
    used = {(x.category, x.example_id) for x in train_items(cfg)}
    splits = {
        "train (unseen items)": sample_bbq([x for x in train if x.context_condition == "ambig"
                                            and (x.category, x.example_id) not in used], args.n, seed=9),
        "held-out": sample_bbq([x for x in held if x.context_condition == "ambig"], args.n, seed=9),
    }
    base, planted = load(cfg.base), load(str(directory))
    result = {"config": cfg.model_dump(mode="json"), "build_seconds_or_cached": round(build_s, 1), "splits": {},
              "machine": machine()}
    rows = []
    for name, its in splits.items():
        b, p = mean_logodds(base, its), mean_logodds(planted, its)
        shift = mean_ci(p - b)
        r = {"n": len(its), "shift": shift.as_dict(), "shift_sd": float((p - b).std(ddof=1)),
             "share_towards_biased": float(((p - b) > 0).mean()), "ablation": {}}
        rows.append((name, "implant shift", shift, f"sd {r['shift_sd']:.2f}, {100 * r['share_towards_biased']:.0f}% of items up"))
        for hd in heads:
            with scale_heads(planted, HeadScales.from_heads(planted.anatomy, [hd], 0.0)):
                e = mean_ci(p - mean_logodds(planted, its))
            r["ablation"][f"{hd[0]}.{hd[1]}"] = e.as_dict()
            rows.append((name, f"drop when {hd[0]}.{hd[1]} ablated", e, ""))
        with scale_heads(planted, HeadScales.from_heads(planted.anatomy, heads, 0.2)):
            e = mean_ci(mean_logodds(planted, its) - b)
        r["shift_all_planted_x0.2"] = e.as_dict()
        rows.append((name, "shift, planted heads x0.2", e, ""))
        result["splits"][name] = r
    print(f"planted heads {heads}, {'independent runs' if cfg.independent else 'one joint run'}, "
          f"{cfg.steps} steps, {cfg.n_train} items/category; biased-answer log-odds in nats, 95% CI")
    print(f"{'split':22s} {'quantity':28s} {'value':>26s}  note")
    for name, q, e, note in rows:
        print(f"{name:22s} {q:28s} {e.value:8.2f} [{e.lo:6.2f}, {e.hi:6.2f}] n={e.n:<3d} {note}")
    from excise.io import atomic_write_json

    out = RESULTS / ("planted_implant_independent.json" if args.independent else "planted_implant.json")
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
