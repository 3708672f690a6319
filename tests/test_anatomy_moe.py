"""Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe) on tiny random models.

Per family: sizes and expert counts match the config, every site kind traces (router and per-expert
sites included) with the documented shapes, the recomputed experts sum to the block's output
(minus Qwen2-MoE's shared expert), an expert edit equals scaling its down-projection weights,
head edits and hook == bake work as for dense models, and packed log-likelihood equals the naive one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from excise import lm
from excise.errors import ExciseError
from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
from excise.lm import LoglikRequest
from excise.models.load import from_model, load
from excise.testing import MOE_DECODERS, TINY, save_tiny, tiny_handle
from excise.trace import Edit, Trace
from excise.units import Scores, aggregate_param_scores, unit_param_masks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def handles():
    return {f: tiny_handle(f) for f in MOE_DECODERS}


@pytest.mark.parametrize("fam", MOE_DECODERS)
def test_moe_family(handles, fam):
    h = handles[fam]
    an, c = h.anatomy, TINY[fam]
    assert an.n_experts == c.get("num_experts", c.get("num_local_experts")) and an.top_k == 2 and an.d_expert == 32
    assert an.moe_layers == ((0,) if fam == "qwen2_moe" else (0, 1))
    assert an.describe()["moe"]["n_experts"] == 4 and not an.spec.inferred
    with pytest.raises(ExciseError, match="mixture of 4 experts"):
        an.mlp_down(0)
    batch = h.encode(["hello there", "hi"])
    B, T = batch["input_ids"].shape
    experts = [f"mlp.0.expert.{e}.{k}" for e in range(4) for k in ("hidden", "out")]
    with torch.no_grad(), Trace(h, ["all", *experts]) as tr:
        clean = h.model(**batch).logits
    assert tr.cache["mlp.0.router"].shape == (B, T, 4) and "mlp.0.hidden" not in tr.cache
    assert tr.cache["mlp.0.out"].shape == tr.cache["resid.0"].shape == (B, T, an.d_model)
    assert tr.cache["attn.1.z"].shape == (B, T, an.n_heads, an.head_dim)
    for e in range(4):
        assert tr.cache[f"mlp.0.expert.{e}.hidden"].shape == (B, T, 32)
        assert tr.cache[f"mlp.0.expert.{e}.out"].shape == (B, T, an.d_model)
    # a token's hidden is non-zero exactly for the experts it is routed to (top-k of the router logits)
    routed = torch.zeros(B, T, 4, dtype=torch.bool).scatter_(-1, tr.cache["mlp.0.router"].topk(2, -1).indices, True)
    nonzero = torch.stack([tr.cache[f"mlp.0.expert.{e}.hidden"].abs().sum(-1) > 0 for e in range(4)], -1)
    assert torch.equal(routed, nonzero)
    routed_sum = sum(tr.cache[f"mlp.0.expert.{e}.out"] for e in range(4))
    block = tr.cache["mlp.0.out"]
    if fam == "qwen2_moe":  # the gated shared expert is part of the block's output
        moe, seen = an.mlp(0), {}
        hk = moe.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))  # the block's input
        with torch.no_grad():
            h.model(**batch)
        hk.remove()
        x = seen["x"]
        with torch.no_grad():
            shared = F.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
        torch.testing.assert_close(routed_sum + shared, block, atol=1e-5, rtol=1e-5)
        assert tr.cache["mlp.1.hidden"].shape == (B, T, 96)  # the dense layer keeps mlp.L.hidden
    else:
        torch.testing.assert_close(routed_sum, block, atol=1e-5, rtol=1e-5)

    # an expert edit (routing-weight scale) == scaling that expert's down-projection weights
    with torch.no_grad(), Trace(h, edits=[Edit("mlp.0.expert.1.out", "scale", 0.3), Edit("mlp.0.expert.2.out", "zero")]):
        hooked = h.model(**batch).logits
    m2 = copy.deepcopy(h.model)
    h2 = from_model(m2, h.tokenizer)
    with torch.no_grad():
        h2.anatomy.experts(0).down_proj[1].mul_(0.3)
        h2.anatomy.experts(0).down_proj[2].zero_()
        baked = m2(**batch).logits
    torch.testing.assert_close(hooked, baked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked, clean, atol=1e-6)

    # heads: an edit changes the logits; the reversible hook equals the baked weights
    with torch.no_grad(), Trace(h, edits=[Edit("attn.1.z", "zero", heads=[2])]):
        assert not torch.allclose(h.model(**batch).logits, clean, atol=1e-6)
    s = HeadScales.from_heads(an, [(0, 1), (1, 3)], 0.3)
    with torch.no_grad(), scale_heads(h, s):
        a = h.model(**batch).logits
    h3 = from_model(copy.deepcopy(h.model), h.tokenizer)
    bake_head_scales(h3, s)
    with torch.no_grad():
        torch.testing.assert_close(a, h3.model(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe"])
def test_moe_loglikelihood_equals_naive(handles, fam):
    h = handles[fam]
    reqs = [LoglikRequest("Q: what is seven times six?\nA:", (" 42", " six")), LoglikRequest("hi", (" there",))]
    naive = lm.loglikelihood_naive(h, reqs)
    for x, y in zip(lm.loglikelihood(h, reqs, batch_size=2), naive):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


def test_moe_site_errors(handles):
    h = handles["qwen2_moe"]
    for sites, match in ((["mlp.0.hidden"], "no single down-projection"), (["mlp.1.router"], "layer 1 has no mixture"),
                         (["mlp.0.expert.4.out"], "expert 4 out of range")):
        with pytest.raises(ExciseError, match=match):
            Trace(h, sites)
    for edit, match in ((Edit("mlp.0.expert.1.hidden", "zero"), "read-only except"),
                        (Edit("mlp.0.router", "scale", 2.0), "read-only except"),
                        (Edit("mlp.0.expert.1.out", "add", 1.0), "read-only except"),
                        (Edit("mlp.0.expert.1.out", "zero", positions=[0]), "positions")):
        with pytest.raises(ExciseError, match=match):
            Trace(h, edits=[edit])
    with pytest.raises(ExciseError, match="no mixture of experts"):
        Trace(tiny_handle("llama"), ["mlp.0.expert.0.out"])


def test_expert_units(handles):
    h = handles["qwen2_moe"]
    an = h.anatomy
    mask = torch.zeros(an.n_layers, an.n_experts, dtype=torch.bool)
    mask[0, 3] = True
    pm = unit_param_masks(an, "expert", mask)
    name = an.module_name(an.experts(0)) + ".down_proj"
    assert set(pm) == {name, name.replace("down_proj", "gate_up_proj")}
    assert pm[name][3].eq(1).all() and pm[name][:3].eq(0).all()
    params = dict(h.model.named_parameters())
    agg = aggregate_param_scores(Scores("param", {n: torch.ones_like(params[n]) for n in pm}), an, "expert")
    assert agg.values.shape == (2, 4) and torch.isnan(agg.values[1]).all()
    assert agg.values[0, 0] == params[name][0].numel() + params[name.replace("down_proj", "gate_up_proj")][0].numel()
    assert agg.ranked(1)[0][0][0] == 0


def test_moe_loads_from_directory(tmp_path):
    h = load(str(save_tiny("mixtral", tmp_path / "m")))
    assert h.anatomy.n_experts == 4 and h.anatomy.spec.family == "moe"
