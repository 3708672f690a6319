"""More decoder families (gemma3_text, granite, starcoder2, cohere, stablelm, phi) on tiny random
models: load, sizes, every site kind traced, a head edit, hook == baked head scales, log-likelihood."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from excise import lm
from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
from excise.lm import LoglikRequest
from excise.models.anatomy import spec_for_model_type
from excise.models.load import from_model
from excise.testing import MORE_DECODERS, TINY, tiny_handle
from excise.trace import Edit, Trace, parse_site

pytestmark = pytest.mark.usefixtures("one_thread")
FAMS = ("gemma3_text", "granite", "starcoder2", "cohere", "stablelm", "phi")


@pytest.mark.parametrize("fam", FAMS)
def test_more_decoder_family(fam):
    assert fam in MORE_DECODERS and spec_for_model_type(fam).is_decoder
    h = tiny_handle(fam)
    an = h.anatomy
    c = TINY[fam]
    expected = dict(n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                    n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                    head_dim=c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]),
                    d_model=c["hidden_size"], d_mlp=c["intermediate_size"])
    for k, v in expected.items():
        assert getattr(an, k) == v, (fam, k)
    assert an.final_norm() is not None and an.lm_head() is not None
    assert an.attn_out_in_features(1) == an.n_heads * an.head_dim

    # every site kind, pooled at the last token
    batch = h.encode(["hello there", "hi"])
    B, T = batch["input_ids"].shape
    with torch.no_grad(), Trace(h, "all", pool="last") as tr:
        clean = h.model(**batch).logits
    shapes = {"resid": (B, an.d_model), "attn.z": (B, an.n_heads, an.head_dim), "attn.pattern": (B, an.n_heads, T),
              "mlp.hidden": (B, an.d_mlp), "mlp.out": (B, an.d_model)}
    assert len(tr.cache) == 5 * an.n_layers
    for name, x in tr.cache.items():
        assert tuple(x.shape) == shapes[parse_site(name).kind], (fam, name)
        assert torch.isfinite(x).all()

    # zeroing one head changes the logits
    with torch.no_grad(), Trace(h, [], [Edit("attn.1.z", "zero", heads=[2])]):
        edited = h.model(**batch).logits
    assert not torch.allclose(clean, edited)

    # the reversible hook equals the baked weights
    s = HeadScales.from_heads(an, [(0, 1), (1, 3)], 0.3)
    with torch.no_grad(), scale_heads(h, s):
        a = h.model(**batch).logits
    h2 = from_model(copy.deepcopy(h.model), h.tokenizer)
    bake_head_scales(h2, s)
    with torch.no_grad():
        b = h2.model(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # log-likelihood: the fast path equals the naive one
    reqs = [LoglikRequest("Q: what is seven times six?\nA:", (" 42", " six", " forty two")),
            LoglikRequest("hi", (" there",))]
    naive = lm.loglikelihood_naive(h, reqs)
    fast = lm.loglikelihood(h, reqs, batch_size=2)
    assert len(fast) == len(naive)
    for x, y in zip(fast, naive):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fam", FAMS)
def test_more_decoder_loads_from_directory(fam, tmp_path):
    """``excise.models.load`` accepts a saved model of the family (no 'unsupported architecture')."""
    from excise.models.load import load
    from excise.testing import save_tiny

    h = load(str(save_tiny(fam, tmp_path / fam)), attn_implementation="eager")
    assert h.kind == "causal-lm" and h.anatomy.spec is spec_for_model_type(fam)
    assert h.anatomy.n_layers == TINY[fam]["num_hidden_layers"]
