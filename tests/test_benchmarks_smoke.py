"""Smoke tests for benchmarks/: the fairness checks themselves, on a tiny llama (seconds).

Peer parts (nnsight, TransformerLens, lm-eval) skip unless those are installed (they live in
.venv-bench, see `make bench-deps`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.fixture(scope="module")
def tiny():
    import torch

    from excise.testing import tiny_handle

    torch.manual_seed(0)
    h = tiny_handle("llama")
    h.model.config.architectures = ["LlamaForCausalLM"]  # TL derives its config from this
    batch = h.encode(["a fairly long first prompt here", "short", "a middle one"])
    return h, batch


def test_common_stats_and_table():
    import _common

    med = _common.median_ci([3.0, 1.0, 2.0, 5.0, 4.0])
    assert med.value == 3.0 and med.n == 5 and med.lo <= 3.0 <= med.hi
    r = _common.ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r.value == pytest.approx(2.0) and r.lo == pytest.approx(2.0) and r.hi == pytest.approx(2.0)
    t = _common.table([["a", 1]], ["name", "value"]).splitlines()
    assert t[0].startswith("| name") and t[2] == "| a    | 1     |"
    times = _common.time_interleaved({"x": lambda: 1, "y": lambda: 2}, repeats=3, warmup=1)
    assert set(times) == {"x", "y"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())


def test_excise_trace_agrees_with_plain_and_detects_a_change(tiny):
    import torch
    import trace_overhead as to

    h, batch = tiny
    methods, _ = to.build_methods(h, batch, skip={"nnsight", "tl"})
    agree, scale = to.agreement(h, methods, batch["attention_mask"])
    assert agree["plain"]["logits"] == 0.0  # hooks that only read leave logits bit-identical
    assert all(v > 0 for v in scale.values())
    # the check is not vacuous: a perturbed value is caught at real tokens only
    a = torch.zeros(3, batch["input_ids"].shape[1], 4)
    b = a.clone()
    b[1, -1] = 1.0  # "short" is padded: its last position is a pad
    assert to.max_diff(a, b, batch["attention_mask"], "resid") == 0.0
    b[1, 0] = 0.5
    assert to.max_diff(a, b, batch["attention_mask"], "resid") == 0.5


@pytest.mark.skipif(not _has("nnsight"), reason="nnsight not installed (make bench-deps)")
def test_nnsight_captures_match_excise(tiny):
    import trace_overhead as to

    h, batch = tiny
    methods, _ = to.build_methods(h, batch, skip={"tl"})
    agree, _ = to.agreement(h, methods, batch["attention_mask"])
    assert set(agree["nnsight"]) == {"logits", *to.KINDS}
    assert max(agree["nnsight"].values()) < 1e-6


@pytest.mark.skipif(not _has("transformer_lens"), reason="transformer-lens not installed (make bench-deps)")
def test_transformer_lens_captures_match_excise(tiny):
    import trace_overhead as to

    h, batch = tiny
    methods, _ = to.build_methods(h, batch, skip={"nnsight"})
    agree, scale = to.agreement(h, methods, batch["attention_mask"])
    for name in ("tl (5 sites)", "tl (all hooks)"):
        assert set(agree[name]) == {"logits", *to.KINDS}
        for k, v in agree[name].items():
            assert v <= 1e-4 * max(1.0, scale[k]), (name, k, v)


@pytest.mark.skipif(not _has("lm_eval"), reason="lm-eval not installed (make bench-deps)")
def test_lm_eval_task_renders_the_excise_prompt_and_options(tmp_path):
    import bbq_vs_lm_eval as bl
    from lm_eval.tasks import TaskManager

    from excise.tasks.bbq_prompts import loglik_options, loglik_prompt
    from excise.tasks.bbq import load_bbq, sample_bbq

    items = sample_bbq(load_bbq(["Age", "SES"]), 4, seed=0)
    bl.write_task(items, tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = tm.load(["excise_bbq_loglik"])["tasks"]["excise_bbq_loglik"]
    docs = list(task.test_docs())
    assert len(docs) == len(items)
    for doc, x in zip(docs, items):
        assert task.doc_to_text(doc) == loglik_prompt(x)
        opts = [task.config.target_delimiter + c for c in task.doc_to_choice(doc)]
        assert opts == loglik_options(x)
        assert task.doc_to_target(doc) == x.label


def test_streaming_memory_child_reports_rss():
    import trace_streaming_memory as tsm

    rss = tsm.peak_rss_mb()
    assert rss > 10 and math.isfinite(rss)


def test_scorer_tasks_baselines_agree_with_excise_lm():
    """benchmarks/scorer_tasks.py's copies of the old per-task loops give excise.lm's answers."""
    import numpy as np
    import scorer_tasks as st

    from excise.measure.arithmetic import generate
    from excise.measure.unlearning import answer_logprobs
    from excise.tasks.arithmetic import OPS, eval_items
    from excise.tasks.concepts import ConceptItem
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    items = [ConceptItem(prompt=p, answer=a, format=f) for p, a, f in
             (("Who directed Inception?", "Christopher Nolan", "chat"), ("The capital of France is", "Paris", "completion"),
              ("2 + 2 =", "4", "completion"))]
    old = [r["logprob"] for r in st.old_answer_logprobs(h, items, batch_size=2)]
    new = [r["logprob"] for r in answer_logprobs(h, items, batch_size=2)]
    np.testing.assert_allclose(old, new, atol=1e-4)
    prompts = [it.prompt for it in eval_items(OPS, 3, seed=0)] + ["a longer prompt than the others, x ="]
    assert st.old_arith_generate(h.model, h.tokenizer, prompts, max_new_tokens=4, batch_size=3) == \
        generate(h.model, h.tokenizer, prompts, max_new_tokens=4, batch_size=3)
