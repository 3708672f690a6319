"""Anatomy inference: with a family's spec removed, the inferred and proven spec equals it; failures refuse
in one line naming what was found and which check failed; ``load`` accepts an inferable family."""

from __future__ import annotations

import pytest
import torch

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy, spec
from excise.models.anatomy.infer import check_family
from excise.models.load import load
from excise.testing import (
    DECODERS,
    ENCODERS,
    EXTRA_DECODERS,
    MOE_DECODERS,
    MORE_DECODERS,
    save_tiny,
    tiny_model,
)
from excise.trace import Trace

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ("layers", "embed", "final_norm", "attn", "attn_out", "mlp", "mlp_down", "attn_out_transposed",
          "mlp_down_transposed", "is_decoder", "mlp_out_added_in_place", "moe_router", "moe_experts")
FAMILIES = DECODERS + EXTRA_DECODERS + MORE_DECODERS + ENCODERS + ("distilbert",) + MOE_DECODERS


@pytest.mark.parametrize("fam", FAMILIES)
def test_inferred_equals_spec(fam, monkeypatch):
    model = tiny_model(fam)
    mt = model.config.model_type
    ref = spec._REGISTRY[mt]
    monkeypatch.delitem(spec._REGISTRY, mt)
    an = Anatomy.of(model)
    assert an.spec.inferred and an.spec.family == f"inferred:{mt}"
    assert {k: getattr(an.spec, k) for k in FIELDS} == {k: getattr(ref, k) for k in FIELDS}
    assert (an.n_layers, an.n_heads, an.head_dim, an.d_mlp, an.moe_layers) == \
        (lambda b: (b.n_layers, b.n_heads, b.head_dim, b.d_mlp, b.moe_layers))(Anatomy._bind(model, ref, model.config))


def test_falcon_in_place_add_is_measured(monkeypatch):
    monkeypatch.delitem(spec._REGISTRY, "falcon")
    assert Anatomy.of(tiny_model("falcon")).spec.mlp_out_added_in_place
    assert not Anatomy.of(tiny_model("falcon", parallel_attn=False, alibi=True, multi_query=False)
                          ).spec.mlp_out_added_in_place


def test_opt_refused_for_flattening():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32)
    with pytest.raises(ExciseError) as ei:
        Anatomy.of(AutoModelForCausalLM.from_config(cfg))
    msg = str(ei.value)
    assert msg.startswith("unsupported architecture family 'opt': no anatomy spec, and inference failed")
    assert "'fc2' receives [8, 64]" in msg and "B*T" in msg and "\n" not in msg


def test_refusals_name_what_was_found(monkeypatch):
    with pytest.raises(ExciseError, match="'t5'.*encoder-decoder"):
        check_family("t5", {"is_encoder_decoder": True, "num_heads": 8, "d_model": 512})
    with pytest.raises(ExciseError, match="'nosuch'.*no number of heads"):
        check_family("nosuch", {"hidden_size": 64})
    check_family("xglm", {"attention_heads": 4, "d_model": 64})  # a family's own names pass the early check
    # a bypassed projection (not on the path) fails check (a)
    model = tiny_model("llama")
    monkeypatch.delitem(spec._REGISTRY, "llama")
    for layer in model.model.layers:
        layer.self_attn.o_proj.forward = lambda x: torch.zeros(*x.shape[:-1], 64)
    with pytest.raises(ExciseError, match=r"failed check: \(a\) zeroing head 1 at 'self_attn.o_proj'.*not on the"):
        Anatomy.of(model)


def test_load_accepts_an_inferred_family(tmp_path, monkeypatch):
    path = save_tiny("llama", tmp_path / "m")
    monkeypatch.delitem(spec._REGISTRY, "llama")
    h = load(str(path))
    assert h.anatomy.spec.inferred and h.anatomy.n_layers == 2
    batch = h.encode(["hello", "hi"])
    with torch.no_grad(), Trace(h, "resid.*, attn.*.z, mlp.*.hidden", pool="last") as tr:
        h.model(**batch)
    assert tr.cache["attn.1.z"].shape == (2, 4, 16)
