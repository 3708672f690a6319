"""Knowledge measures for concept unlearning, each with n and a 95% CI.

* leak rate under greedy generation, per probe family (Wilson interval);
* the teacher-forced log-probability of the revealing answer given the question: it moves
  before greedy outputs flip, so small changes are visible (mean and bootstrap CI over items);
* retain accuracy (expected answer in the greedy generation), overall and per group; with
  ``retain_unscreened`` also on every retain evaluation item, before screening kept only those the
  base model answers (``retain_accuracy_unscreened``: the screened baseline is 100% by construction);
* perplexity on neutral text (bootstrap over passages of the token-weighted mean NLL).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from excise import lm
from excise.measure.frame import GroupedResult, estimate_from_dict
from excise.measure.stats import Estimate, bootstrap, mean_ci, wilson
from excise.tasks.concepts import format_prompt


def generate(handle: Any, items: Sequence[Any], *, max_new_tokens: int = 24, batch_size: int = 16,
             model: Any = None) -> list[str]:
    """Greedy continuations of the items' prompts (:func:`excise.lm.generate`)."""
    return lm.generate(handle, [format_prompt(handle, it) for it in items], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, model=model)


def answer_logprobs(handle: Any, items: Sequence[Any], *, batch_size: int = 16, model: Any = None,
                    responses: Sequence[str] | None = None) -> list[dict]:
    """Per item: summed and per-token log-probability of its target response after its prompt,
    teacher-forced (:func:`excise.lm.loglikelihood`)."""
    reqs = [lm.LoglikRequest(format_prompt(handle, it), (responses[i] if responses is not None else it.target(),))
            for i, it in enumerate(items)]
    lps = lm.loglikelihood(handle, reqs, batch_size=batch_size, model=model)
    _, o_lists = lm.encode_requests(handle.tokenizer, reqs)
    rows = []
    for lp, os_ in zip(lps, o_lists):
        v, n_tok = float(lp[0]), len(os_[0])
        rows.append({"logprob": v, "n_tokens": n_tok, "token_logprob": v / max(n_tok, 1), "prob": math.exp(v)})
    return rows


def perplexity(handle: Any, texts: Sequence[str], *, batch_size: int = 8, model: Any = None, seed: int = 0) -> Estimate:
    """Token-weighted perplexity with a bootstrap CI over passages (NaN, n=0 without text)."""
    if not texts:
        return Estimate.undefined("perplexity")
    model = model if model is not None else handle.model
    per: list[tuple[float, int]] = []
    for s in range(0, len(texts), batch_size):
        enc = handle.encode(list(texts[s:s + batch_size]))
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, lm.IGNORE)
        with torch.inference_mode():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        lg = torch.log_softmax(logits[:, :-1].float(), -1)
        lb = labels[:, 1:]
        m = lb != lm.IGNORE
        tok_lp = lg.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for i in range(lb.shape[0]):
            per.append((float(-(tok_lp[i] * m[i]).sum()), int(m[i].sum())))
    arr = np.array(per, dtype=float)

    def stat(rows: np.ndarray) -> float:
        rows = np.asarray(rows, dtype=float).reshape(-1, 2)
        return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum())) if rows[:, 1].sum() > 0 else float("nan")

    est = bootstrap(arr, stat, seed=seed)
    return Estimate(est.value, est.lo, est.hi, est.n, "perplexity-bootstrap")


def _est(e: Estimate) -> dict:
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}


def evaluate(handle: Any, spec: Any, *, model: Any = None, max_new_tokens: int = 24, batch_size: int = 16,
             seed: int = 0, generations: dict[str, list[str]] | None = None,
             retain_unscreened: Sequence[Any] | None = None) -> dict:
    """All knowledge measures of one model state on a (filtered) spec.

    Returns ``{"metrics": {...}, "items": [...]}``: metrics hold an estimate dict (value, lo, hi,
    n) per measure; items hold one row per probe/retain item with its generation and flags.
    ``generations`` reuses greedy outputs already computed (e.g. by the filtering step; key
    ``retain_unscreened`` for those items). ``retain_unscreened``: the retain evaluation items before
    screening, measured as ``retain_accuracy_unscreened`` (rows of set ``retain_unscreened``).
    """
    metrics: dict[str, Any] = {}
    rows: list[dict] = []
    sets = spec.probe_sets()
    all_leaks: list[int] = []
    adv_leaks: list[int] = []
    for fam, items in sets.items():
        gens = (generations or {}).get(fam) or generate(handle, items, max_new_tokens=max_new_tokens,
                                                         batch_size=batch_size, model=model)
        flags = [int(spec.leaks(it, g)) for it, g in zip(items, gens)]
        metrics[f"leak.{fam}"] = _est(wilson(sum(flags), len(flags)))
        all_leaks += flags
        if fam.startswith("adv_"):
            adv_leaks += flags
        for it, g, f in zip(items, gens, flags):
            rows.append({"set": fam, "prompt": it.prompt, "format": it.format, "generation": g, "leak": f})
    metrics["leak.adversarial"] = _est(wilson(sum(adv_leaks), len(adv_leaks)))
    metrics["leak.all"] = _est(wilson(sum(all_leaks), len(all_leaks)))
    # teacher-forced answer probability on direct and paraphrased probes
    for fam in ("direct", "paraphrase"):
        if fam in sets:
            lp = answer_logprobs(handle, sets[fam], model=model, batch_size=batch_size)
            metrics[f"answer_logprob.{fam}"] = _est(mean_ci([r["logprob"] for r in lp]))
            metrics[f"answer_prob.{fam}"] = _est(bootstrap(np.array([r["prob"] for r in lp]), lambda a: float(np.mean(a.astype(float))), seed=seed))
            for it, r in zip(sets[fam], lp):
                for row in rows:
                    if row["set"] == fam and row["prompt"] == it.prompt:
                        row.update(answer_logprob=r["logprob"], answer_prob=r["prob"])
    known: dict[tuple[str, str], str] = {}
    u_rows: list[dict] = []
    if retain_unscreened is not None:
        u_gens = (generations or {}).get("retain_unscreened") or generate(
            handle, retain_unscreened, max_new_tokens=max_new_tokens, batch_size=batch_size, model=model)
        u_ok = [int(spec.correct(it, g)) for it, g in zip(retain_unscreened, u_gens)]
        u_est = _est(wilson(sum(u_ok), len(u_ok)))
        for it, g, o in zip(retain_unscreened, u_gens, u_ok):
            known[(it.prompt, it.format)] = g
            u_rows.append({"set": "retain_unscreened", "prompt": it.prompt, "format": it.format, "generation": g,
                           "correct": o, "group": it.group})
    gens = (generations or {}).get("retain")
    if not gens:  # the screened items are a subset of the unscreened ones: reuse their generations
        gens = ([known[(it.prompt, it.format)] for it in spec.retain]
                if all((it.prompt, it.format) in known for it in spec.retain) else
                generate(handle, spec.retain, max_new_tokens=max_new_tokens, batch_size=batch_size, model=model))
    ok = [int(spec.correct(it, g)) for it, g in zip(spec.retain, gens)]
    metrics["retain_accuracy"] = _est(wilson(sum(ok), len(ok)))
    for grp in sorted({it.group for it in spec.retain if it.group}):
        sub = [o for it, o in zip(spec.retain, ok) if it.group == grp]
        metrics[f"retain_accuracy.{grp}"] = _est(wilson(sum(sub), len(sub)))
    for it, g, o in zip(spec.retain, gens, ok):
        rows.append({"set": "retain", "prompt": it.prompt, "format": it.format, "generation": g, "correct": o,
                     "group": it.group})
    if retain_unscreened is not None:
        metrics["retain_accuracy_unscreened"] = u_est
    rows += u_rows
    metrics["neutral_perplexity"] = _est(perplexity(handle, spec.neutral, model=model, seed=seed))
    return {"metrics": metrics, "items": rows}


def frame(res: dict, build_sets: tuple[str, ...] = ("direct",)) -> GroupedResult:
    """:func:`evaluate`'s output as the shared result type (groups: probe sets and retain groups).

    Probe sets whose items build or tune the intervention (``build_sets``: the direct probes the
    unlearning trains on) are left out, so the result is reported on held-out items only.
    """
    rows = [r for r in res["items"] if r["set"] not in build_sets]
    probes = [r for r in rows if "leak" in r]
    retain = [r for r in rows if r["set"] == "retain"]
    overall = {"leak.heldout": wilson(sum(r["leak"] for r in probes), len(probes)),
               "retain_accuracy": wilson(sum(r["correct"] for r in retain), len(retain))}
    for k, v in res["metrics"].items():
        if k == "neutral_perplexity" or (k.startswith("answer_prob.") and k.split(".", 1)[1] not in build_sets):
            overall[k] = estimate_from_dict(v)
    by_group: dict[str, dict[str, Any]] = {}
    for s in sorted({r["set"] for r in probes}):
        sub = [r["leak"] for r in probes if r["set"] == s]
        by_group[f"probe:{s}"] = {"leak": wilson(sum(sub), len(sub))}
    for g in sorted({r.get("group") or "all" for r in retain}):
        sub = [r["correct"] for r in retain if (r.get("group") or "all") == g]
        by_group[f"retain:{g}"] = {"retain_accuracy": wilson(sum(sub), len(sub))}
    return GroupedResult(overall, by_group, {}, group_by="set")
