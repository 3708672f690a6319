"""Trace: capture shapes, padding-aware pooling, edits, patching, gradients, streaming to disk."""

from __future__ import annotations

import os

import pytest
import torch

from excise.errors import ExciseError
from excise.testing import DECODERS, ENCODERS, tiny_handle
from excise.trace import Edit, Trace, expand_sites, parse_site, run_with_cache
from excise.trace_store import ActivationStore, trace_dataset

FAMILIES = DECODERS + ENCODERS
TEXTS = ["the cat sat on the mat", "hi", "a longer sentence, with commas"]
# roberta-style models number positions from padding_idx + 1
POS_OFFSET = ("roberta", "xlm-roberta")


# tiny models: one thread is much faster than two contended ones
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def handles():
    return {fam: tiny_handle(fam) for fam in FAMILIES}


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _forward(h, batch, position_ids=None):
    kw = dict(batch)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    return _out(h.model(**kw))


def _positions(fam, batch):
    """Position ids the model would give each sequence run alone (absolute positions matter for left padding)."""
    mask = batch["attention_mask"].long()
    if fam in POS_OFFSET:  # roberta: tokens equal to padding_idx (1, also the stand-in bos) keep position 1
        real = mask * (batch["input_ids"] != 1).long()
        return real.cumsum(-1) * real + 1
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


# --- shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("pool", ["all", "last", "mean"])
def test_capture_shapes(handles, fam, pool):
    h = handles[fam]
    an = h.anatomy
    batch = h.encode(TEXTS)
    B, T = batch["input_ids"].shape
    with torch.no_grad(), Trace(h, "all", pool=pool) as tr:
        _forward(h, batch)
    full = {
        "resid": (B, T, an.d_model),
        "attn.z": (B, T, an.n_heads, an.head_dim),
        "attn.pattern": (B, an.n_heads, T, T),
        "mlp.hidden": (B, T, an.d_mlp),
        "mlp.out": (B, T, an.d_model),
    }
    assert len(tr.cache) == 5 * an.n_layers
    for name, x in tr.cache.items():
        shape = full[parse_site(name).kind]
        if pool != "all":
            t_axis = 2 if name.endswith("pattern") else 1
            shape = shape[:t_axis] + shape[t_axis + 1:]
        assert tuple(x.shape) == shape, (name, pool)
        assert torch.isfinite(x).all()


# --- pooling vs running each sequence alone ---------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_matches_unpadded(handles, fam, side):
    h = handles[fam]
    sites = ["resid.1", "attn.1.z", "mlp.0.hidden", "mlp.1.out", "attn.1.pattern"]
    batch = h.encode(TEXTS, padding_side=side)
    pos = _positions(fam, batch)
    caches = {}
    for pool in ("last", "mean"):
        with torch.no_grad(), Trace(h, sites, pool=pool) as tr:
            _forward(h, batch, pos)
        caches[pool] = dict(tr.cache)
    for i, text in enumerate(TEXTS):
        alone = h.encode([text])
        with torch.no_grad(), Trace(h, sites, pool="all") as tr:
            _forward(h, alone)
        for s in sites:
            x = tr.cache[s][0]  # no batch axis
            if s.endswith("pattern"):
                # [H, Tq, Tk]: compare query-pooled rows on the real keys only
                got_last = caches["last"][s][i]
                keys = batch["attention_mask"][i].bool()
                torch.testing.assert_close(got_last[:, keys], x[:, -1], atol=1e-5, rtol=1e-4)
                continue
            torch.testing.assert_close(caches["last"][s][i], x[-1], atol=1e-4, rtol=1e-4, msg=f"{s} last {side}")
            torch.testing.assert_close(caches["mean"][s][i], x.mean(0), atol=1e-4, rtol=1e-4, msg=f"{s} mean {side}")


def test_pool_last_finds_positional_attention_mask(handles):
    """attention_mask passed positionally is still read (BERT: forward(input_ids, attention_mask))."""
    h = handles["bert"]
    batch = h.encode(TEXTS)
    with torch.no_grad(), Trace(h, ["resid.1"], pool="last") as tr:
        h.model(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad(), Trace(h, ["resid.1"], pool="last") as tr2:
        h.model(**batch)
    assert torch.equal(tr.cache["resid.1"], tr2.cache["resid.1"])


@pytest.mark.parametrize("fam", FAMILIES)
def test_pattern_rows_sum_to_one(handles, fam):
    h = handles[fam]
    batch = h.encode(TEXTS)
    with torch.no_grad(), Trace(h, "attn.*.pattern") as tr:
        _forward(h, batch)
    mask = batch["attention_mask"].bool()
    for name, p in tr.cache.items():
        sums = p.sum(-1)  # [B, H, Tq]
        real = mask[:, None, :].expand_as(sums)
        torch.testing.assert_close(sums[real], torch.ones_like(sums[real]), atol=1e-5, rtol=0)
        # no real query attends to padded keys (a padded query row may be uniform where every key is
        # masked for it: DeBERTa-v2's 2D mask, ModernBERT's sliding window)
        pad_key_real_query = (~mask[:, None, None, :] & mask[:, None, :, None]).expand_as(p)
        assert p.masked_select(pad_key_real_query).abs().max() < 1e-6
        if fam in DECODERS:  # causal: nothing above the diagonal
            assert torch.triu(p[0], diagonal=1).abs().max() == 0


# --- identity ------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_empty_trace_and_capture_only_are_bit_identical(handles, fam):
    h = handles[fam]
    batch = h.encode(TEXTS)
    with torch.no_grad():
        plain = _forward(h, batch)
        with Trace(h) as tr:
            empty = _forward(h, batch)
        assert tr._handles == []  # nothing registered
        with Trace(h, "all", pool="mean"):
            captured = _forward(h, batch)
        with Trace(h, "all", detach=False):
            captured_grad = _forward(h, batch)
    assert torch.equal(plain, empty)
    assert torch.equal(plain, captured)
    assert torch.equal(plain, captured_grad)
    # hooks are gone after the context
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in h.model.modules())


# --- edits ---------------------------------------------------------------------------------

EDIT_SITES = ["resid.0", "attn.0.z", "mlp.0.hidden", "mlp.0.out"]


def _clean(h, batch, sites):
    with torch.no_grad(), Trace(h, sites) as tr:
        out = _forward(h, batch)
    return out, dict(tr.cache)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("site", EDIT_SITES)
def test_edit_ops(handles, fam, site):
    h = handles[fam]
    batch = h.encode(TEXTS)
    out0, clean = _clean(h, batch, [site])
    x0 = clean[site]
    v = torch.randn(x0.shape[-1], generator=torch.Generator().manual_seed(0))
    cases = [
        (Edit(site, "zero"), torch.zeros_like(x0)),
        (Edit(site, "scale", 2.0), 2 * x0),
        (Edit(site, "add", v), x0 + v),
        (Edit(site, "patch", v), v.expand_as(x0)),
    ]
    for edit, expected in cases:
        with torch.no_grad(), Trace(h, [site], [edit]) as tr:
            out = _forward(h, batch)
        torch.testing.assert_close(tr.cache[site], expected, atol=1e-6, rtol=1e-6, msg=f"{edit.op}")
        assert not torch.allclose(out, out0), f"{edit.op} at {site} did not change the output"
    # neutral edits leave the output bit-identical
    for edit in (Edit(site, "scale", 1.0), Edit(site, "add", 0.0), Edit(site, "patch", x0)):
        with torch.no_grad(), Trace(h, [], [edit]):
            assert torch.equal(_forward(h, batch), out0), edit.op


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gemma", "bert"])
def test_edit_heads_and_positions(handles, fam):
    h = handles[fam]
    an = h.anatomy
    batch = h.encode(["abcdefgh", "ijklmnop"])  # equal lengths: no padding
    out0, clean = _clean(h, batch, ["attn.0.z", "resid.0"])
    z0 = clean["attn.0.z"]

    with torch.no_grad(), Trace(h, ["attn.0.z"], [Edit("attn.0.z", "zero", heads=[1, 3])]) as tr:
        out_h = _forward(h, batch)
    z = tr.cache["attn.0.z"]
    assert z[:, :, [1, 3]].abs().max() == 0
    assert torch.equal(z[:, :, [0, 2]], z0[:, :, [0, 2]])
    # a per-head scale vector is the same edit
    vec = torch.ones(an.n_heads)
    vec[[1, 3]] = 0
    with torch.no_grad(), Trace(h, [], [Edit("attn.0.z", "scale", vec)]):
        assert torch.equal(_forward(h, batch), out_h)

    with torch.no_grad(), Trace(h, ["attn.0.z"], [Edit("attn.0.z", "zero", heads=[2], positions=[0, -1])]) as tr:
        _forward(h, batch)
    z = tr.cache["attn.0.z"]
    assert z[:, [0, -1], 2].abs().max() == 0
    assert torch.equal(z[:, 1:-1], z0[:, 1:-1])
    assert torch.equal(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])

    with torch.no_grad(), Trace(h, ["resid.0"], [Edit("resid.0", "scale", 3.0, positions=[-1])]) as tr:
        out_p = _forward(h, batch)
    r = tr.cache["resid.0"]
    torch.testing.assert_close(r[:, -1], 3 * clean["resid.0"][:, -1])
    assert torch.equal(r[:, :-1], clean["resid.0"][:, :-1])
    if fam != "bert":  # causal: earlier positions cannot see the edited last one
        torch.testing.assert_close(out_p[:, :-1], out0[:, :-1], atol=1e-6, rtol=0)
    assert not torch.allclose(out_p[:, -1], out0[:, -1])


def test_star_edit_applies_to_every_layer(handles):
    h = handles["llama"]
    batch = h.encode(TEXTS)
    edit = Edit("attn.*.z", "zero")
    with torch.no_grad(), Trace(h, ["attn.*.z"], [edit]) as tr:
        _forward(h, batch)
    assert edit.site == "attn.*.z"  # the caller's edit is not mutated
    for l in range(h.anatomy.n_layers):
        assert tr.cache[f"attn.{l}.z"].abs().max() == 0


def test_mlp_hidden_zero_equals_mlp_out_zero_without_bias(handles):
    """llama's down_proj has no bias: zeroing its input is zeroing its output."""
    h = handles["llama"]
    batch = h.encode(TEXTS)
    with torch.no_grad():
        with Trace(h, [], [Edit("mlp.1.hidden", "zero")]):
            a = _forward(h, batch)
        with Trace(h, [], [Edit("mlp.1.out", "zero")]):
            b = _forward(h, batch)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fam", FAMILIES)
def test_patch_from_other_run_reproduces_it(handles, fam):
    """Activation patching sanity check: patching run B's residual into run A gives B's output."""
    h = handles[fam]
    a = h.encode(["abcdefgh", "the dog."])
    b = h.encode(["zyxwvuts", "a cat..."])
    for layer in range(h.anatomy.n_layers):
        site = f"resid.{layer}"
        out_b, cache_b = _clean(h, b, [site])
        with torch.no_grad(), Trace(h, [], [Edit(site, "patch", cache_b[site])]):
            out_a = _forward(h, a)
        torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    # patching every head's z at the last layer plus the MLP output reproduces B's last block output
    L = h.anatomy.n_layers - 1
    out_b, cache_b = _clean(h, b, [f"resid.{L - 1}"])
    with torch.no_grad(), Trace(h, [], [Edit(f"resid.{L - 1}", "patch", cache_b[f"resid.{L - 1}"])]):
        torch.testing.assert_close(_forward(h, a), out_b, atol=1e-5, rtol=1e-5)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resid", "resid.x", "attn.0.q", "mlp.0", "foo.0", "attn.0.z.1", ""])
def test_unknown_site_name(handles, name):
    with pytest.raises(ExciseError, match="unknown site"):
        Trace(handles["llama"], [name])


def test_bad_layer_edit_and_pool(handles):
    h = handles["llama"]
    with pytest.raises(ExciseError, match="out of range"):
        Trace(h, ["resid.7"])
    with pytest.raises(ExciseError, match="pooling"):
        Trace(h, ["resid.0"], pool="max")  # type: ignore[arg-type]
    with pytest.raises(ExciseError, match="read-only"):
        Trace(h, [], [Edit("attn.0.pattern", "zero")])
    with pytest.raises(ExciseError, match="'heads' only applies"):
        Trace(h, [], [Edit("resid.0", "zero", heads=[0])])
    with pytest.raises(ExciseError, match="heads \\[9\\] out of range"):
        Trace(h, [], [Edit("attn.0.z", "zero", heads=[9])])
    with pytest.raises(ExciseError, match="unknown edit op"):
        Edit("resid.0", "mul", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ExciseError, match="needs a value"):
        Edit("resid.0", "scale")
    assert expand_sites("resid.*, mlp.1.out", 2) == ["resid.0", "resid.1", "mlp.1.out"]


@pytest.mark.parametrize("impl", ["sdpa"])
def test_pattern_needs_eager(impl):
    h = tiny_handle("llama", attn_implementation=impl)
    with pytest.raises(ExciseError, match="eager"):
        Trace(h, ["attn.0.pattern"])
    # other sites work with any attention implementation
    with torch.no_grad(), Trace(h, ["attn.0.z"]) as tr:
        h.model(**h.encode(TEXTS))
    assert tr.cache["attn.0.z"].shape[2] == h.anatomy.n_heads


# --- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
def test_detach_false_lets_gradients_flow(handles, fam):
    h = handles[fam]
    batch = h.encode(TEXTS)
    sites = ["resid.0", "attn.0.z", "mlp.0.hidden", "mlp.1.out"]
    with Trace(h, sites, detach=False) as tr:
        out = _forward(h, batch)
    for s in sites:
        assert tr.cache[s].requires_grad, s
        tr.cache[s].retain_grad()
    out.float().pow(2).mean().backward()
    for s in sites:
        g = tr.cache[s].grad
        assert g is not None and g.shape == tr.cache[s].shape and g.abs().sum() > 0, s
    h.model.zero_grad(set_to_none=True)
    # the gradient at attn.0.z is the true one: compare with autograd through an explicit input
    an = h.anatomy
    z_in = {}

    def pre(module, args):
        x = args[0].detach().requires_grad_(True)
        z_in["x"] = x
        return (x, *args[1:])

    hd = an.attn_out(0).register_forward_pre_hook(pre)
    try:
        out2 = _forward(h, batch)
    finally:
        hd.remove()
    out2.float().pow(2).mean().backward()
    ref = z_in["x"].grad.view_as(tr.cache["attn.0.z"].grad)
    torch.testing.assert_close(tr.cache["attn.0.z"].grad, ref, atol=1e-6, rtol=1e-5)
    h.model.zero_grad(set_to_none=True)

    with Trace(h, ["resid.0"]) as tr:
        _forward(h, batch)
    assert not tr.cache["resid.0"].requires_grad


def test_accumulate_and_run_with_cache(handles):
    h = handles["llama"]
    with torch.no_grad(), Trace(h, ["resid.1"], pool="last", accumulate=True) as tr:
        h.model(**h.encode(TEXTS[:2]))
        h.model(**h.encode(TEXTS[2:]))
    logits, cache = run_with_cache(h, TEXTS, ["resid.1"], pool="last")
    assert tr.cache["resid.1"].shape == (3, h.anatomy.d_model)
    torch.testing.assert_close(tr.cache["resid.1"], cache["resid.1"], atol=1e-5, rtol=1e-5)
    assert logits.shape[:2] == h.encode(TEXTS)["input_ids"].shape
    with pytest.raises(ExciseError, match="accumulate"):
        with torch.no_grad(), Trace(h, ["resid.1"], pool="all", accumulate=True):
            h.model(**h.encode(["ab"]))
            h.model(**h.encode(["abc"]))


# --- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["last", "mean"])
def test_trace_dataset_roundtrip(handles, tmp_path, pool):
    h = handles["gpt2"]
    texts = [f"sample number {i} " + "x" * (i % 5) for i in range(11)]
    sites = ["resid.*", "attn.1.z", "mlp.0.hidden"]
    store = trace_dataset(h, texts, sites, tmp_path / "acts", pool=pool, batch_size=2, shard_size=4, progress=False)
    files = sorted(os.listdir(tmp_path / "acts"))
    assert "manifest.json" in files
    shards = [f for f in files if f.startswith("shard-")]
    assert len(shards) == len(store.manifest["shards"]) == 3  # 2+2 | 2+2 | 2+1: a shard every >= 4 samples
    assert sum(s["n"] for s in store.manifest["shards"]) == len(store) == 11
    assert store.sites == expand_sites(sites, 2)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left
    reopened = ActivationStore(tmp_path / "acts")
    _, cache = run_with_cache(h, texts, sites, pool=pool)
    for s in reopened.sites:
        torch.testing.assert_close(reopened.load(s), cache[s], atol=1e-5, rtol=1e-5)
    assert store.manifest["shapes"]["attn.1.z"] == [4, 16]
    with pytest.raises(ExciseError, match="not traced"):
        reopened.load("resid.9")
    with pytest.raises(ExciseError, match="pool"):
        trace_dataset(h, texts, sites, tmp_path / "x", pool="all")


def test_trace_dataset_failure_leaves_nothing(handles, tmp_path, monkeypatch):
    h = handles["llama"]
    calls = {"n": 0}
    real = h.encode

    def flaky(texts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(texts, **kw)

    monkeypatch.setattr(h, "encode", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        trace_dataset(h, [f"t{i}" for i in range(10)], ["resid.0"], tmp_path / "acts", batch_size=2, shard_size=2,
                      progress=False)
    assert os.listdir(tmp_path) == []


def test_activation_store_errors(tmp_path):
    with pytest.raises(ExciseError, match="no manifest"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"sites": []}')
    with pytest.raises(ExciseError, match="missing field 'shards'"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"sites": [}')
    with pytest.raises(ExciseError, match="manifest.json:1"):
        ActivationStore(tmp_path)


def test_edit_value_shape_mismatch_is_one_line_error(handles):
    h = handles["llama"]
    batch = h.encode(TEXTS)
    _, pooled = run_with_cache(h, TEXTS, ["resid.0"], pool="last")  # [B, D]: not the site's [B, T, D]
    with pytest.raises(ExciseError, match="does not broadcast") as ei:
        with torch.no_grad(), Trace(h, [], [Edit("resid.0", "patch", pooled["resid.0"])]):
            h.model(**batch)
    assert "\n" not in str(ei.value)
    with pytest.raises(ExciseError, match="does not broadcast"):
        with torch.no_grad(), Trace(h, [], [Edit("mlp.0.out", "add", torch.ones(5))]):
            h.model(**batch)
    # a [B, 1, D] steering vector broadcasts over positions
    with torch.no_grad(), Trace(h, ["resid.0"], [Edit("resid.0", "patch", pooled["resid.0"][:, None])]) as tr:
        h.model(**batch)
    assert torch.equal(tr.cache["resid.0"][:, 3], pooled["resid.0"])


def test_trace_dataset_empty(handles, tmp_path):
    with pytest.raises(ExciseError, match="no texts"):
        trace_dataset(handles["llama"], [], ["resid.0"], tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_inner_model_call_uses_its_own_mask(handles):
    """Calling the inner model directly after a padded call must not pool with the stale mask."""
    h = handles["llama"]
    padded = h.encode(["abcdef", "ab"])
    full = h.encode(["uvwxyz", "qrstuv"])
    with torch.no_grad(), Trace(h, ["resid.1"], pool="last") as tr:
        h.model(**padded)
        h.model.model(input_ids=full["input_ids"])  # no mask: every position is real
        inner = tr.cache["resid.1"]
    _, ref = run_with_cache(h, full, ["resid.1"], pool="last")
    torch.testing.assert_close(inner, ref["resid.1"], atol=1e-5, rtol=1e-5)


def test_trace_dataset_refuses_patterns_and_skips_unused_logits(handles, tmp_path):
    h = handles["llama"]
    with pytest.raises(ExciseError, match="does not shard"):
        trace_dataset(h, ["a short one", "a much longer sentence"], "attn.*.pattern", tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
    seen = {}
    hook = h.model.lm_head.register_forward_hook(lambda m, a, o: seen.setdefault("T", o.shape[1]))
    try:
        trace_dataset(h, ["a longer sample text", "xy"], ["resid.0"], tmp_path / "a", progress=False)
    finally:
        hook.remove()
    assert seen["T"] == 1  # the LM head ran on the last position only


def test_grad_from_embeddings_reaches_sites_with_frozen_weights():
    """Gradient localizers: with every weight frozen, captured sites still carry a graph; no weight gets a grad."""
    h = tiny_handle("llama")
    for p in h.model.parameters():
        p.requires_grad_(False)
    batch = h.encode(["hello there", "hi"])
    with torch.enable_grad(), Trace(h, ["attn.1.z", "mlp.0.hidden"], detach=False, grad_from_embeddings=True) as tr:
        out = h.model(**batch).logits.sum()
        gz, gm = torch.autograd.grad(out, [tr.cache["attn.1.z"], tr.cache["mlp.0.hidden"]])
    assert gz.abs().sum() > 0 and gm.abs().sum() > 0
    assert all(p.grad is None for p in h.model.parameters())
    with torch.enable_grad(), Trace(h, ["attn.1.z"], detach=False) as tr:  # without it: no graph at all
        h.model(**batch)
    assert not tr.cache["attn.1.z"].requires_grad
