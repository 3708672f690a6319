"""The knowledge organism's method comparison over seeds (issue 14): mean and t-interval per variant.

Reads finished ``compare: true`` runs of ``recipes/concept_knowledge.yaml`` (a run without the
comparison contributes its default variant from its ``tofu`` stage; one directory per seed, e.g. ``excise run recipes/concept_knowledge.yaml --set seed=1 --set unlearn.seed=1 --set
compare=true --out runs/concept_knowledge_s1``) and reports, per variant (the organism, the
oracle, masked LoRA on saliency / random units, LoRA on all units, full fine-tuning, at equal
steps): TOFU forget quality (and how many seeds reach p >= 0.05), model utility, forget answer
probability, accuracy on retained films sharing an answer with a forgotten one and on the others,
the held-out direct leak and the relearning attack's steps to return. Then the paired differences
(same seed) of each masked variant against LoRA on all units, random units and full fine-tuning:
the issue's "localization helps or it does not"; and the localization check (its units ablated on
held-out items against random units of equal count, ``compare/localization.json``). Writes ``benchmarks/results/concept_knowledge_seeds.{md,json}``.

    .venv/bin/python benchmarks/concept_seeds.py runs/concept_knowledge runs/concept_knowledge_s1 runs/concept_knowledge_s2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METRICS = [("forget quality", "overall", "forget_quality"), ("model utility", "overall", "model_utility"),
           ("forget answer prob", "overall", "forget_answer_prob"), ("MIA AUC", "overall", "mia_min_k_auc"),
           ("shared-answer accuracy", "retain_shared", "accuracy"), ("other retain accuracy", "retain_other", "accuracy")]
FQ_BAR = 0.05


def read_run(d: Path) -> dict[str, dict[str, float]]:
    """variant -> metric -> value for one finished comparison run."""
    from excise.io import read_json

    cmp = d / "compare"
    if not (cmp / "tofu.json").exists():  # a default run without the comparison: its own TOFU stage
        cmp = d / "tofu"
    if not (cmp / "tofu.json").exists():
        from excise.errors import ExciseError

        raise ExciseError(f"{d} has no finished TOFU stage or comparison (tofu/tofu.json, compare/tofu.json)")
    out = {}
    for v in read_json(cmp / "tofu.json"):
        g = read_json(cmp / f"tofu_{v}.json")
        row = {name: (g["overall"] if scope == "overall" else g["by_group"].get(scope, {})).get(key, {}).get("value")
               for name, scope, key in METRICS}
        info = cmp / v / "info.json"
        if v == "organism" and (d / "before" / "items.jsonl").exists():  # before unlearning, same held-out probes
            row["direct leak"] = _leak(d / "before" / "items.jsonl")
        elif cmp.name == "tofu" and v != "oracle":  # the default variant: its unlearn stage
            row["direct leak"] = _leak(d / "unlearn" / "items.jsonl")
        elif info.exists():
            i = read_json(info)
            s2r = i["relearn"]["steps_to_return"]
            row["relearn steps to return"] = float(s2r) if s2r is not None else float(i["relearn"]["max_steps"] + 1)
            row["direct leak"] = _leak(cmp / v / "items.jsonl")
        out[v] = {k: (math.nan if x is None else float(x)) for k, x in row.items()}
    return out


def localization(runs: list[Path]) -> dict:
    """``"mask / items"`` -> (mean over seeds of selected minus random, seeds whose own CI is above 0)."""
    from excise.io import read_json
    from excise.measure.stats import mean_ci

    per: dict[str, list[dict]] = {}
    for d in runs:
        f = d / "compare" / "localization.json"
        if f.exists():
            for mask, m in read_json(f)["masks"].items():
                for items, s in m["sets"].items():
                    per.setdefault(f"{mask} / {items}", []).append(s["selected_minus_random"])
    return {k: (mean_ci([e["value"] if e["value"] is not None else math.nan for e in es]),
                sum((e.get("lo") or -1.0) > 0 for e in es)) for k, es in per.items()}


def _leak(items: Path) -> float:
    """Held-out direct leak rate from a variant's per-item rows."""
    from excise.io import iter_jsonl

    rows = [r for _, r in iter_jsonl(items) if r.get("set") == "direct"]
    return sum(bool(r.get("leak")) for r in rows) / len(rows) if rows else math.nan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one finished comparison run per seed")
    ap.add_argument("--masked", nargs="+", default=["masked_saliency", "masked_fisher"],
                    help="the localized variants, each compared with every --pair variant seed by seed")
    ap.add_argument("--pair", nargs="+", default=["plain_lora", "masked_random", "full_ft"],
                    help="the variants the localized ones are compared with")
    ap.add_argument("--out", default=str(_common.RESULTS / "concept_knowledge_seeds"))
    args = ap.parse_args(argv)
    from excise.io import atomic_write_json, atomic_write_text
    from excise.measure.stats import mean_ci

    runs = [read_run(d) for d in args.runs]
    variants = list(dict.fromkeys(v for r in runs for v in r))
    names = [m[0] for m in METRICS] + ["direct leak", "relearn steps to return"]
    fmt = lambda e: "-" if not e.defined else (f"{e.value:.3g}" if e.lo is None or math.isnan(e.lo)  # noqa: E731
                                               else f"{e.value:.3g} [{e.lo:.3g}, {e.hi:.3g}]")
    summary: dict = {}
    body = []
    for v in variants:
        per = [r[v] for r in runs if v in r]
        est = {m: mean_ci([p.get(m, math.nan) for p in per]) for m in names}
        reach = sum(p["forget quality"] >= FQ_BAR for p in per)
        summary[v] = {"n_seeds": len(per), "fq_reaches_0.05": reach, **{m: e.as_dict() for m, e in est.items()}}
        body.append([v, len(per), f"{reach}/{len(per)}", *[fmt(est[m]) for m in names]])
    md = (f"Knowledge organism, {len(runs)} seeds ({', '.join(map(str, args.runs))}); mean and 95% t-interval over "
          "seeds. Forget quality is a KS p-value per seed (its mean is shown; the column before counts the seeds at "
          f"p >= {FQ_BAR}). Relearn steps to return: the attack's max steps + 1 where the leak never came back.\n\n" + _common.table(body, ["variant", "seeds", "FQ >= 0.05", *names]))
    pairs: dict = {}
    for masked in args.masked:
        for other in args.pair:
            both = [(r[masked], r[other]) for r in runs if masked in r and other in r]
            if not both:
                continue
            diff = {m: mean_ci([a.get(m, math.nan) - b.get(m, math.nan) for a, b in both]) for m in names}
            pairs[f"{masked} - {other}"] = {m: e.as_dict() for m, e in diff.items()} | {"n_seeds": len(both)}
            md += (f"\n\nPaired {masked} minus {other} ({len(both)} seeds):\n\n"
                   + _common.table([[m, fmt(diff[m])] for m in names], ["metric", "difference"]))
    loc = localization(args.runs)
    if loc:
        md += ("\n\nLocalization check: the localizer's units ablated on held-out items, minus random units of equal "
               "count (drop of the answer's mean token log-prob; positive: the units matter more); mean and t-interval "
               "over seeds, and the seeds whose own paired CI is above 0:\n\n"
               + _common.table([[k, f"{e.n}", fmt(e), f"{above}/{e.n}"] for k, (e, above) in loc.items()],
                               ["mask / items", "seeds", "selected - random", "seeds with CI > 0"]))
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    atomic_write_json(out.with_suffix(".json"), {"runs": [str(d) for d in args.runs], "variants": summary,
                                                 "paired": pairs, "machine": _common.machine(),
                                                 "localization": {k: {**e.as_dict(), "seeds_ci_above_0": above}
                                                                  for k, (e, above) in loc.items()}})
    print(md)
    return 0


if __name__ == "__main__":
    _common.run_main(main)
