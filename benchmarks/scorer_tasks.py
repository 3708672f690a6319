"""Concept answer log-probs and arithmetic evaluation: the shared scorer (excise.lm) vs the old per-task loops.

Before excise.lm, each task owned its scoring loop; this script keeps a copy of the two simple
ones as the baseline and times them against the shared scorer on the same items and model:

* **concept answer log-probs** (SmolLM2-135M-Instruct, the packaged ``inception`` spec: every
  forget, paraphrase, adversarial and retain item with its target response): the old
  ``measure.unlearning.answer_logprobs`` -- one right-padded teacher-forcing batch of
  ``prompt + response`` and a full forward pass (LM head and log-softmax at every position) --
  vs ``excise.measure.unlearning.answer_logprobs`` = :func:`excise.lm.loglikelihood` (packed
  prefix tree, LM head only where a response token is scored);
* **arithmetic evaluation** (the UNDO workflow's pretrained arithmetic decoder, built or reused
  from the excise cache by ``excise.tasks.arithmetic.pretrain``): the old
  ``measure.arithmetic.generate`` -- prompts bucketed by token length, a hand-written greedy
  KV-cache loop -- vs ``excise.measure.arithmetic.generate`` = :func:`excise.lm.generate`
  (``model.generate`` on length-sorted, left-padded batches).

Both sides are timed interleaved (``_common.time_interleaved``: rotating order, after warm-up),
wall clock and process CPU time, with the same torch thread count; agreement is checked
(log-probs within float noise, generations identical).

    .venv/bin/python benchmarks/scorer_tasks.py                      # defaults: all concept items, 200 per op
    .venv/bin/python benchmarks/scorer_tasks.py --arith-model DIR    # an arithmetic model directory instead
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


# ---------------------------------------------------------------- the old per-task loops (baselines)

def old_answer_logprobs(handle, items, *, batch_size=16):
    """The pre-excise.lm ``measure.unlearning.answer_logprobs`` (with ``tasks.concepts.encode_items``)."""
    import torch

    from excise.models.load import add_special_tokens_for
    from excise.tasks.concepts import format_prompt

    tok = handle.tokenizer
    rows = []
    for s in range(0, len(items), batch_size):
        chunk = list(items[s:s + batch_size])
        seqs, labs = [], []
        for it in chunk:
            prompt = format_prompt(handle, it)
            p_ids = list(tok.encode(prompt, add_special_tokens=add_special_tokens_for([prompt])))
            r_ids = list(tok.encode(it.target(), add_special_tokens=False))
            seqs.append(p_ids + r_ids)
            labs.append([-100] * len(p_ids) + r_ids)
        T = max(len(x) for x in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (x, l) in enumerate(zip(seqs, labs)):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(l)] = torch.tensor(l)
            mask[i, :len(x)] = 1
        with torch.inference_mode():
            logits = handle.model(input_ids=ids, attention_mask=mask).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        lb = labels[:, 1:]
        m = lb != -100
        tok_lp = lp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m
        tot = tok_lp.sum(-1)
        for i in range(len(chunk)):
            n_tok = int(m[i].sum())
            rows.append({"logprob": float(tot[i]), "n_tokens": n_tok, "token_logprob": float(tot[i]) / max(n_tok, 1),
                         "prob": math.exp(float(tot[i]))})
    return rows


def old_arith_generate(model, tokenizer, prompts, *, max_new_tokens=5, batch_size=256):
    """The pre-excise.lm ``measure.arithmetic.generate``: length buckets, hand-written greedy KV loop."""
    import torch

    from excise.lm_packed import CACHE

    device = next(model.parameters()).device
    ids_list = [tokenizer(p, return_tensors="pt", padding=False)["input_ids"][0].tolist() for p in prompts]
    buckets = defaultdict(list)
    for i, ids in enumerate(ids_list):
        buckets[len(ids)].append(i)
    out = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for _, idx in sorted(buckets.items()):
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.tensor([ids_list[i] for i in chunk], device=device)
                res = model(input_ids=x, use_cache=True)
                past, gen = getattr(res, CACHE), []
                nxt = res.logits[:, -1].argmax(-1)
                for t in range(max_new_tokens):
                    gen.append(nxt)
                    if t + 1 == max_new_tokens:
                        break
                    res = model(input_ids=nxt[:, None], use_cache=True, **{CACHE: past})
                    past = getattr(res, CACHE)
                    nxt = res.logits[:, -1].argmax(-1)
                g = torch.stack(gen, 1).cpu()
                for j, i in enumerate(chunk):
                    out[i] = tokenizer.decode(g[j].tolist(), skip_special_tokens=True)
    return out


# ---------------------------------------------------------------- benchmark

def _row(name, n, wall, cpu, base_cpu=None):
    w, c = statistics.median(wall), statistics.median(cpu)
    sp = f"{statistics.median(base_cpu) / c:.2f}x" if base_cpu else "1.00x"
    return [name, n, f"{w:.1f}", f"{c:.1f}", f"{c / n:.2f}", f"{n / (w / 1e3):.1f}", sp]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="inception", help="concept spec (packaged name or path)")
    ap.add_argument("--concept-n", type=int, default=0, help="concept items (0: every item of the spec; more: cycled)")
    ap.add_argument("--concept-batch-size", type=int, default=16)
    ap.add_argument("--arith-n-per-op", type=int, default=200, help="arithmetic eval items per operation")
    ap.add_argument("--arith-batch-size", type=int, default=256)
    ap.add_argument("--arith-model", default=None, help="arithmetic model directory (default: excise's pretrained "
                    "UNDO base model, built into the cache on first use)")
    ap.add_argument("--no-arith", action="store_true", help="skip the arithmetic benchmark")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from excise.measure import arithmetic as ma
    from excise.measure.unlearning import answer_logprobs
    from excise.models import load
    from excise.run import seed_everything
    from excise.tasks.arithmetic import OPS, eval_items
    from excise.organisms.arithmetic import PretrainConfig, load_model, pretrain
    from excise.tasks.concepts import load_concept

    seed_everything(0)
    torch.set_num_threads(args.threads)
    header = ["task / scorer", "n", "wall ms / call", "CPU ms / call", "CPU ms / item", "items/s (wall)",
              "CPU speed-up"]
    rows, result = [], {"args": vars(args)}

    # concept answer log-probs
    h = load("smollm2-135m-instruct")
    spec = load_concept(args.concept)
    items = list(spec.forget) + list(spec.paraphrases) + list(spec.adversarial) + list(spec.retain)
    if args.concept_n:
        items = [items[i % len(items)] for i in range(args.concept_n)]
    bs = args.concept_batch_size
    cpu: dict[str, list[float]] = {}
    wall = _common.time_interleaved({"old": lambda: old_answer_logprobs(h, items, batch_size=bs),
                                     "lm": lambda: answer_logprobs(h, items, batch_size=bs)},
                                    args.repeats, args.warmup, cpu)
    a = np.array([r["logprob"] for r in old_answer_logprobs(h, items, batch_size=bs)])
    b = np.array([r["logprob"] for r in answer_logprobs(h, items, batch_size=bs)])
    diff = float(np.abs(a - b).max())
    rows += [_row("concept answer log-probs: old loop (padded, full LM head)", len(items), wall["old"], cpu["old"]),
             _row("concept answer log-probs: excise.lm.loglikelihood", len(items), wall["lm"], cpu["lm"], cpu["old"])]
    result["concept"] = {"n": len(items), "batch_size": bs, "wall_ms": wall, "cpu_ms": cpu, "logprob_max_abs_diff": diff}
    print(f"concept: {len(items)} items, |old - lm| log-prob max {diff:.2e}", flush=True)

    # arithmetic evaluation
    if not args.no_arith:
        t0 = time.perf_counter()
        d = Path(args.arith_model) if args.arith_model else pretrain(PretrainConfig())
        build_s = time.perf_counter() - t0
        ah = load_model(d)
        its = eval_items(OPS, args.arith_n_per_op, seed=0)
        prompts = [it.prompt for it in its]
        abs_ = args.arith_batch_size
        cpu = {}
        wall = _common.time_interleaved(
            {"old": lambda: old_arith_generate(ah.model, ah.tokenizer, prompts, batch_size=abs_),
             "lm": lambda: ma.generate(ah.model, ah.tokenizer, prompts, batch_size=abs_)}, args.repeats, args.warmup, cpu)
        g_old = old_arith_generate(ah.model, ah.tokenizer, prompts, batch_size=abs_)
        g_new = ma.generate(ah.model, ah.tokenizer, prompts, batch_size=abs_)
        same = sum(x == y for x, y in zip(g_old, g_new))
        acc = float(np.mean([ma.first_number(g) == it.answer for g, it in zip(g_new, its)]))
        rows += [_row("arithmetic eval: old loop (length buckets, hand-written KV)", len(its), wall["old"], cpu["old"]),
                 _row("arithmetic eval: excise.lm.generate", len(its), wall["lm"], cpu["lm"], cpu["old"])]
        result["arithmetic"] = {"n": len(its), "batch_size": abs_, "model": str(d), "build_or_load_s": round(build_s, 1),
                                "wall_ms": wall, "cpu_ms": cpu, "identical_generations": same, "accuracy": acc}
        print(f"arithmetic: {len(its)} items, {same}/{len(its)} generations identical, accuracy {acc:.3f}, "
              f"model {d} ({build_s:.0f} s to build or load)", flush=True)

    tab = _common.table(rows, header)
    mach = _common.machine()
    print()
    print(tab)
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up; torch threads {args.threads}; "
          f"load average {mach['loadavg_1_5_15']} on {mach['cores']} cores")
    n_tag = result["concept"]["n"]
    _common.save(f"scorer_tasks_{n_tag}", {**result, "machine": mach, "table": tab})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
