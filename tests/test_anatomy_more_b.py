"""Anatomy for falcon, gptj, bloom (decoders) and distilbert (encoder) on tiny random models.

Per family: sizes match the config, every site kind traces with the right shapes, zeroing one
head at ``attn.L.z`` changes the output, the reversible head-scale hook equals baked weights, and
(decoders) packed log-likelihood equals the naive one. Falcon runs in three layouts: the default
parallel attention with multi-query keys/values, ``new_decoder_architecture`` with grouped
keys/values, and sequential blocks with ALiBi. OPT is not here: its decoder layer flattens
batch and time before ``fc1``/``fc2``, so ``mlp.L.hidden``/``mlp.L.out`` would be [B*T, F].
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from excise import lm, lm_packed
from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
from excise.lm import LoglikRequest
from excise.models.load import from_model
from excise.testing import MORE_DECODERS, MORE_ENCODERS, tiny_handle
from excise.trace import Edit, Trace

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    pytest.param("falcon", {}, id="falcon"),
    pytest.param("falcon", dict(new_decoder_architecture=True, num_kv_heads=2), id="falcon-new_arch"),
    pytest.param("falcon", dict(alibi=True, multi_query=False, parallel_attn=False), id="falcon-alibi-seq"),
    pytest.param("gptj", {}, id="gptj"),
    pytest.param("bloom", {}, id="bloom"),
    pytest.param("distilbert", {}, id="distilbert"),
]
MINE_DECODERS = ("falcon", "gptj", "bloom")


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("fam,over", CASES)
def test_family(fam, over):
    assert fam in MORE_DECODERS or fam in MORE_ENCODERS
    h = tiny_handle(fam, **over)
    an = h.anatomy
    sizes = dict(n_layers=2, n_heads=4, head_dim=16, d_model=64, d_mlp=256)
    assert {k: getattr(an, k) for k in sizes} == sizes
    assert an.spec.family == fam and an.spec.is_decoder == (fam in MORE_DECODERS)
    assert an.attn_out_in_features(1) == an.n_heads * an.head_dim

    batch = h.encode(["hello there", "hi"])
    B, T = batch["input_ids"].shape
    seen = {}  # what the down-projection really returned (falcon adds attention into it in place later)
    hk = an.mlp_down(1).register_forward_hook(lambda m, a, o: seen.update(out=o.clone(), hidden=a[0].clone()))
    try:
        with torch.no_grad(), Trace(h, "all", pool="all") as tr:
            base = _out(h.model(**batch))
    finally:
        hk.remove()
    torch.testing.assert_close(tr.cache["mlp.1.out"], seen["out"], atol=0, rtol=0)
    torch.testing.assert_close(tr.cache["mlp.1.hidden"], seen["hidden"], atol=0, rtol=0)
    for l in range(an.n_layers):
        assert tr.cache[f"resid.{l}"].shape == (B, T, an.d_model)
        assert tr.cache[f"attn.{l}.z"].shape == (B, T, an.n_heads, an.head_dim)
        assert tr.cache[f"attn.{l}.pattern"].shape == (B, an.n_heads, T, T)
        assert tr.cache[f"mlp.{l}.hidden"].shape == (B, T, an.d_mlp)
        assert tr.cache[f"mlp.{l}.out"].shape == (B, T, an.d_model)
        rows = tr.cache[f"attn.{l}.pattern"].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)
    with torch.no_grad(), Trace(h, "attn.1.z, mlp.1.out, resid.1", pool="last") as tr:
        h.model(**batch)
    assert tr.cache["attn.1.z"].shape == (B, an.n_heads, an.head_dim)
    assert tr.cache["mlp.1.out"].shape == tr.cache["resid.1"].shape == (B, an.d_model)

    # zeroing one head at attn.L.z changes the output
    with torch.no_grad(), Trace(h, edits=[Edit("attn.1.z", "zero", heads=[2])]):
        edited = _out(h.model(**batch))
    assert not torch.allclose(edited, base, atol=1e-6)

    # the reversible head-scale hook equals baked weights
    s = HeadScales.from_heads(an, [(0, 1), (1, 3)], 0.3)
    with torch.no_grad(), scale_heads(h, s):
        a = _out(h.model(**batch))
    h2 = from_model(copy.deepcopy(h.model), h.tokenizer, kind=h.kind)
    bake_head_scales(h2, s)
    with torch.no_grad():
        b = _out(h2.model(**batch))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, base, atol=1e-6)


@pytest.mark.parametrize("fam,over", [c for c in CASES if c.values[0] in MINE_DECODERS])
def test_loglikelihood_equals_naive(fam, over):
    """ALiBi models (bloom, falcon with alibi) take the KV-cache path: their bias is built from a 2D mask."""
    assert fam in MORE_DECODERS
    h = tiny_handle(fam, **over)
    assert lm_packed.packed_ok(h.model) == (fam != "bloom" and not over.get("alibi", False))
    reqs = [LoglikRequest("Q: what is seven times six?\nA:", (" 42", " a", " nobody")),
            LoglikRequest("hi", (" the chair",))]
    naive = lm.loglikelihood_naive(h, reqs)
    for bs in (1, 2):
        got = lm.loglikelihood(h, reqs, batch_size=bs)
        assert len(got) == len(naive)
        for x, y in zip(got, naive):
            assert np.shape(x) == np.shape(y)
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
