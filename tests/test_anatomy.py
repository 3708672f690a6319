"""Anatomy per architecture family, on tiny random models built from configs."""

from __future__ import annotations

import pytest
import torch

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy, AnatomySpec, spec_for_model_type, supported_model_types
from excise.testing import DECODERS, ENCODERS, TINY, tiny_model

torch.set_num_threads(1)  # tiny models: one thread beats two contended ones
FAMILIES = DECODERS + ENCODERS


@pytest.fixture(scope="module")
def models():
    return {fam: tiny_model(fam) for fam in FAMILIES}


def _expected(fam: str) -> dict:
    c = TINY[fam]
    n_layers = c.get("num_hidden_layers", c.get("n_layer"))
    n_heads = c.get("num_attention_heads", c.get("n_head"))
    d_model = c.get("hidden_size", c.get("n_embd"))
    return {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": c.get("num_key_value_heads", n_heads),
        "head_dim": c.get("head_dim", d_model // n_heads),
        "d_model": d_model,
        # GPT-2's n_inner defaults to 4 * n_embd
        "d_mlp": c.get("intermediate_size", 4 * d_model),
    }


@pytest.mark.parametrize("fam", FAMILIES)
def test_sizes_match_config(models, fam):
    an = Anatomy.of(models[fam])
    for k, v in _expected(fam).items():
        assert getattr(an, k) == v, (fam, k)
    d = an.describe()
    assert d["n_layers"] == an.n_layers and d["n_params"] == sum(p.numel() for p in models[fam].parameters())


@pytest.mark.parametrize("fam", FAMILIES)
def test_modules_resolve(models, fam):
    m = models[fam]
    an = Anatomy.of(m)
    assert len(an.layers()) == an.n_layers
    for l in range(an.n_layers):
        assert an.layer(l) is an.layers()[l]
        for mod in (an.attn(l), an.attn_out(l), an.mlp(l), an.mlp_down(l)):
            assert isinstance(mod, torch.nn.Module)
        # the attention output projection takes all heads concatenated; the down-projection d_mlp
        assert an.attn_out_in_features(l) == an.n_heads * an.head_dim
        assert an.mlp_down_in_features(l) == an.d_mlp
    emb = an.embed()
    assert isinstance(emb, torch.nn.Embedding) and emb.num_embeddings == m.config.vocab_size
    if fam in DECODERS:
        assert an.final_norm() is not None
        assert an.lm_head() is not None and an.lm_head().weight.shape[0] == m.config.vocab_size
        assert an.spec.is_decoder
    else:
        assert not an.spec.is_decoder
    names = an.describe()["modules"]
    assert "{l}" in names["attn_out"] and "{l}" in names["mlp_down"]
    # module names point at real modules
    assert an.module_name(an.attn_out(1)) == names["attn_out"].replace("{l}", "1")


def test_gpt2_conv1d_transposed(models):
    an = Anatomy.of(models["gpt2"])
    assert an.spec.attn_out_transposed and an.spec.mlp_down_transposed
    w = an.attn_out(0).weight
    assert w.shape == (an.n_heads * an.head_dim, an.d_model)  # [in, out]


@pytest.mark.parametrize("fam", ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3"])
def test_grouped_query_attention(models, fam):
    an = Anatomy.of(models[fam])
    assert an.n_kv_heads < an.n_heads
    assert an.n_heads % an.n_kv_heads == 0


@pytest.mark.parametrize("fam", ["gemma", "gemma2"])
def test_gemma_head_dim_not_hidden_over_heads(models, fam):
    an = Anatomy.of(models[fam])
    assert an.head_dim == 24 and an.head_dim != an.d_model // an.n_heads
    assert an.attn_out_in_features(0) == 4 * 24


def test_layer_out_of_range(models):
    an = Anatomy.of(models["llama"])
    with pytest.raises(ExciseError, match="layer 2 out of range"):
        an.layer(2)
    with pytest.raises(ExciseError, match="out of range"):
        an.attn_out(-1)


def test_unknown_architecture_opt():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32)
    m = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ExciseError) as ei:
        Anatomy.of(m)
    msg = str(ei.value)  # no spec: inference finds fc2, then its proof sees batch and time flattened
    assert "'opt'" in msg and "'fc2'" in msg and "B*T" in msg and "\n" not in msg


def test_unknown_architecture_t5_and_fake():
    from transformers import T5Config, T5Model

    m = T5Model(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, vocab_size=64))
    with pytest.raises(ExciseError, match="'t5'.*encoder-decoder"):
        Anatomy.of(m)
    with pytest.raises(ExciseError, match="unsupported architecture family 'no-such-family'"):
        spec_for_model_type("no-such-family")


def test_registered_family_with_wrong_layout_names_missing_module(models):
    """A spec whose per-layer paths do not resolve fails with one line naming the family and the module."""
    import excise.models.anatomy as A

    bad = AnatomySpec(family="badllama", model_types=("llama",), layers="layers", embed="embed_tokens",
                      attn="self_attn", attn_out="self_attn.out_proj", mlp="mlp", mlp_down="mlp.down_proj")
    good = A._REGISTRY["llama"]
    A._REGISTRY["llama"] = bad
    try:
        with pytest.raises(ExciseError) as ei:
            Anatomy.of(models["llama"])
    finally:
        A._REGISTRY["llama"] = good
    assert "badllama" in str(ei.value) and "self_attn.out_proj" in str(ei.value)

    bad_layers = AnatomySpec(family="badlayers", model_types=("llama",), layers="blocks", embed="embed_tokens",
                             attn="self_attn", attn_out="self_attn.o_proj", mlp="mlp", mlp_down="mlp.down_proj")
    A._REGISTRY["llama"] = bad_layers
    try:
        with pytest.raises(ExciseError, match="badlayers.*'blocks' not found"):
            Anatomy.of(models["llama"])
    finally:
        A._REGISTRY["llama"] = good


def test_supported_model_types_cover_tiny_families():
    types = supported_model_types()
    for fam in FAMILIES:
        assert fam in types


def test_anatomy_of_peft_model():
    from peft import LoraConfig, get_peft_model

    m = tiny_model("llama")
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    an = Anatomy.of(pm)
    assert an.n_layers == 2 and an.d_mlp == 128
    assert an.attn_out_in_features(0) == an.n_heads * an.head_dim


@pytest.mark.parametrize("fam", ["qwen3", "olmo", "olmo2", "smollm3"])
def test_other_registered_llama_layouts(fam):
    """Registered model types outside DECODERS: sizes, every site, and hook == baked head scales."""
    import copy

    from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
    from excise.models.load import from_model
    from excise.testing import EXTRA_DECODERS, tiny_handle
    from excise.trace import Trace

    assert fam in EXTRA_DECODERS
    h = tiny_handle(fam)
    an = h.anatomy
    for k, v in _expected(fam).items():
        assert getattr(an, k) == v, (fam, k)
    batch = h.encode(["hello there", "hi"])
    with torch.no_grad(), Trace(h, "all", pool="last") as tr:
        h.model(**batch)
    assert tr.cache["attn.1.pattern"].shape == (2, an.n_heads, batch["input_ids"].shape[1])
    assert tr.cache["attn.1.z"].shape == (2, an.n_heads, an.head_dim)
    s = HeadScales.from_heads(an, [(0, 1), (1, 3)], 0.3)
    with torch.no_grad(), scale_heads(h, s):
        a = h.model(**batch).logits
    h2 = from_model(copy.deepcopy(h.model), h.tokenizer)
    bake_head_scales(h2, s)
    with torch.no_grad():
        b = h2.model(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
