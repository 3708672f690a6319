"""Head scaling: hook == weight edit, scale 0 == the head's term removed by hand, reversibility, files."""

from __future__ import annotations

import copy

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
from excise.models.load import from_model
from excise.select import Mask
from excise.testing import DECODERS, tiny_handle

torch.set_num_threads(1)
FAMILIES = DECODERS + ("bert",)
TEXTS = ["the quick brown fox", "jumps over", "a lazy dog!"]


@pytest.fixture(scope="module")
def handles():
    return {fam: tiny_handle(fam) for fam in FAMILIES}


def _out(h, batch):
    with torch.no_grad():
        o = h.model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _random_scales(an, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(an.n_layers, an.n_heads, generator=g)
    v[0, 1] = 0.0
    v[-1, 0] = 1.0
    return HeadScales(v)


@pytest.mark.parametrize("fam", FAMILIES)
def test_hook_equals_baked_weights(handles, fam):
    h = handles[fam]
    batch = h.encode(TEXTS)
    scales = _random_scales(h.anatomy)
    base = _out(h, batch)
    with scale_heads(h, scales):
        hooked = _out(h, batch)
    assert not torch.allclose(hooked, base)
    baked_model = copy.deepcopy(h.model)
    baked = from_model(baked_model, h.tokenizer, kind=h.kind)
    bake_head_scales(baked, scales)
    out_baked = _out(baked, batch)
    torch.testing.assert_close(out_baked, hooked, atol=1e-5, rtol=1e-5)
    # only the attention output projection weights changed, and only the scaled heads' slices
    an = baked.anatomy
    before = dict(h.model.named_parameters())
    changed = {n for n, p in baked.model.named_parameters() if not torch.equal(p, before[n])}
    expected = {an.module_name(an.attn_out(l)) + ".weight" for l in range(an.n_layers)}
    assert changed == expected
    w0, w1 = h.anatomy.attn_out(0).weight, an.attn_out(0).weight
    Dh = an.head_dim
    cols = slice(0, Dh)  # head 0 of layer 0 has scale v[0, 0]
    if an.spec.attn_out_transposed:
        torch.testing.assert_close(w1[cols], w0[cols] * scales.values[0, 0])
    else:
        torch.testing.assert_close(w1[:, cols], w0[:, cols] * scales.values[0, 0])


def _head_term(an, l, z, head):
    """The head's contribution to the attention output projection, computed by hand: z_h @ W_O[head]^T."""
    w = an.attn_out(l).weight
    sl = slice(head * an.head_dim, (head + 1) * an.head_dim)
    zh = z[..., head, :]
    return zh @ w[sl] if an.spec.attn_out_transposed else zh @ w[:, sl].T


@pytest.mark.parametrize("fam", FAMILIES)
def test_scale_zero_removes_exactly_the_head_term(handles, fam):
    h = handles[fam]
    an = h.anatomy
    batch = h.encode(TEXTS)
    seen = {}

    def grab(module, args, output):
        seen["in"] = args[0].detach().clone()
        seen["out"] = output.detach().clone()

    hd = an.attn_out(0).register_forward_hook(grab)
    try:
        _out(h, batch)
        z = seen["in"].view(*seen["in"].shape[:-1], an.n_heads, an.head_dim)
        clean_out = seen["out"]
        for head in (0, an.n_heads - 1):
            with scale_heads(h, HeadScales.from_heads(an, [(0, head)], scale=0.0)):
                _out(h, batch)
            expected = clean_out - _head_term(an, 0, z, head)
            torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
        # scale 0.5 removes half of it
        with scale_heads(h, HeadScales.from_heads(an, [(0, 1)], scale=0.5)):
            _out(h, batch)
        torch.testing.assert_close(seen["out"], clean_out - 0.5 * _head_term(an, 0, z, 1), atol=1e-5, rtol=1e-5)
    finally:
        hd.remove()


@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
def test_hook_equals_trace_edit(handles, fam):
    from excise.trace import Edit, Trace

    h = handles[fam]
    batch = h.encode(TEXTS)
    with scale_heads(h, HeadScales.from_heads(h.anatomy, [(1, 2)], 0.0)):
        a = _out(h, batch)
    with Trace(h, [], [Edit("attn.1.z", "zero", heads=[2])]):
        b = _out(h, batch)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fam", FAMILIES)
def test_remove_restores_bit_identical(handles, fam):
    h = handles[fam]
    batch = h.encode(TEXTS)
    base = _out(h, batch)
    hook = scale_heads(h, _random_scales(h.anatomy, seed=1))
    assert not torch.equal(_out(h, batch), base)
    hook.remove()
    assert torch.equal(_out(h, batch), base)
    hook.remove()  # idempotent
    # all-ones scales register no hook at all
    with scale_heads(h, HeadScales.ones(h.anatomy)) as hk:
        assert hk._trace._handles == []
        assert torch.equal(_out(h, batch), base)


def test_save_load_roundtrip(handles, tmp_path):
    an = handles["llama"].anatomy
    s = _random_scales(an, seed=3)
    path = s.save(tmp_path)
    assert path.name == HeadScales.FILE and path.exists()
    for src in (tmp_path, path):
        back = HeadScales.load(src)
        assert torch.equal(back.values, s.values)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "excise.head_scales/1"
    # save then bake from the loaded file gives the same model as baking directly
    back.check(an)


def test_errors(handles, tmp_path):
    an = handles["llama"].anatomy
    with pytest.raises(ExciseError, match="n_layers, n_heads"):
        HeadScales(torch.ones(4))
    wrong = HeadScales(torch.ones(an.n_layers + 1, an.n_heads))
    with pytest.raises(ExciseError, match="shape"):
        scale_heads(handles["llama"], wrong)
    with pytest.raises(ExciseError, match="shape"):
        bake_head_scales(handles["llama"], wrong)
    with pytest.raises(ExciseError, match="out of range"):
        HeadScales.from_heads(an, [(0, an.n_heads)])
    with pytest.raises(ExciseError, match="no head scales"):
        HeadScales.load(tmp_path)
    (tmp_path / HeadScales.FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ExciseError, match="cannot read head scales"):
        HeadScales.load(tmp_path)
    # the original weights were never touched by the failed calls
    fresh = tiny_handle("llama")
    assert torch.equal(fresh.anatomy.attn_out(0).weight, an.attn_out(0).weight)


def test_from_mask_and_pruned(handles):
    an = handles["gpt2"].anatomy
    m = torch.zeros(an.n_layers, an.n_heads, dtype=torch.bool)
    m[1, 3] = m[0, 0] = True
    hs = HeadScales.from_mask(Mask("head", m), scale=0.25)
    assert hs.pruned() == [(0, 0), (1, 3)]
    assert hs.values[1, 3] == 0.25 and hs.values.sum() == an.n_layers * an.n_heads - 2 + 0.5
    with pytest.raises(ExciseError, match="mask over neurons"):
        HeadScales.from_mask(Mask("neuron", m))


def test_context_manager_applies_scales_once(handles):
    """Regression: ``with scale_heads(...)`` used to attach the hooks twice (scales squared)."""
    h = handles["llama"]
    batch = h.encode(TEXTS)
    s = HeadScales.from_heads(h.anatomy, [(1, 0)], scale=0.5)
    hook = scale_heads(h, s)
    once = _out(h, batch)
    hook.remove()
    with scale_heads(h, s) as hk:
        assert len(hk._trace._handles) == 1
        assert torch.equal(_out(h, batch), once)
