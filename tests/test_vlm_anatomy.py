"""Vision-language models: vision anatomy per family, vision.L / projector.out sites, loading, tiny builders."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf

from excise.errors import ExciseError
from excise.models import load
from excise.models.anatomy import Anatomy, VisionAnatomy
from excise.testing import CAPTION_FAMILIES, save_tiny, tiny_handle, tiny_image, tiny_vlm, tiny_vlm_parts, vlm_inputs
from excise.trace import Edit, Trace, expand_sites, parse_site, run_with_cache

HAS_NUM2WORDS = importlib.util.find_spec("num2words") is not None
NEEDS_NUM2WORDS = pytest.mark.skipif(not HAS_NUM2WORDS, reason="SmolVLM's processor needs num2words")
FAMILIES = ["llava", "clip", "qwen2_vl", "qwen2_5_vl", "idefics3", pytest.param("smolvlm", marks=NEEDS_NUM2WORDS)]
CAPTIONERS = [f for f in FAMILIES if (f.values[0] if hasattr(f, "values") else f) in CAPTION_FAMILIES]
# documented shapes with B = 2 images of 32x32 px, 8 px patches (16 patches), pool="all"
SHAPES = {
    "llava": {"vision": (2, 17, 32), "projector.out": (2, 16, 64)},  # CLS + 16 patches; 'default' drops CLS
    "clip": {"vision": (2, 17, 32), "projector.out": (2, 16)},  # the image embedding
    "qwen2_vl": {"vision": (32, 32), "projector.out": (8, 64)},  # flat: 2 x 16 patches, merged 2x2 -> 2 x 4
    "qwen2_5_vl": {"vision": (32, 32), "projector.out": (8, 64)},  # the same, in window order
    "idefics3": {"vision": (2, 16, 32), "projector.out": (2, 4, 64)},  # pixel shuffle by 2
    "smolvlm": {"vision": (2, 16, 32), "projector.out": (2, 4, 64)},
}
PROCESSORS = {"llava": "LlavaProcessor", "clip": "CLIPProcessor", "qwen2_vl": "Qwen2VLProcessor",
              "qwen2_5_vl": "Qwen2_5_VLProcessor",
              "idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}

_CACHE: dict[str, object] = {}


def _handle(family):
    if family not in _CACHE:
        _CACHE[family] = tiny_vlm(family)
    return _CACHE[family]


def _logits(out):
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def _run(h, batch, **trace_kw):
    with torch.no_grad(), Trace(h, **trace_kw) as tr:
        out = h.model(**batch)
    return _logits(out), tr.cache


@pytest.mark.parametrize("family", FAMILIES)
def test_captures_vision_projector_and_lm_sites_in_one_forward(family):
    h = _handle(family)
    assert h.vision.spec.family == ("idefics3" if family == "smolvlm" else family)
    assert h.vision.n_layers == 2 and h.vision.d_vision == 32
    batch = vlm_inputs(h, [tiny_image(0), tiny_image(1)])
    logits, cache = _run(h, batch, capture=["vision.*", "projector.out", "resid.*"])
    for l in range(2):
        assert tuple(cache[f"vision.{l}"].shape) == SHAPES[family]["vision"]
    assert tuple(cache["projector.out"].shape) == SHAPES[family]["projector.out"]
    T = batch["input_ids"].shape[1]
    assert tuple(cache["resid.1"].shape) == (2, T, h.anatomy.d_model)
    for pool in ("mean", "last", "cls"):  # per image, whatever the layout
        _, pooled = _run(h, batch, capture=["vision.0", "projector.out"], pool=pool)
        assert tuple(pooled["vision.0"].shape) == (2, 32)
        assert pooled["projector.out"].shape[0] == 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_flat_layout_pools_per_image(family):
    h = _handle(family)
    batch = vlm_inputs(h, [tiny_image(0), tiny_image(1)])
    _, full = _run(h, batch, capture=["vision.1", "projector.out"])
    _, mean = _run(h, batch, capture=["vision.1", "projector.out"], pool="mean")
    _, cls = _run(h, batch, capture=["vision.1"], pool="cls")
    _, last = _run(h, batch, capture=["vision.1"], pool="last")
    v = full["vision.1"].view(2, 16, 32)
    assert torch.allclose(mean["vision.1"], v.mean(1), atol=1e-6)
    assert torch.equal(cls["vision.1"], v[:, 0]) and torch.equal(last["vision.1"], v[:, -1])  # (window order in 2.5)
    assert torch.allclose(mean["projector.out"], full["projector.out"].view(2, 4, 64).mean(1), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_projector_out_transplants_the_other_image(family):
    h = _handle(family)
    a, b = vlm_inputs(h, [tiny_image(0)]), vlm_inputs(h, [tiny_image(1)])
    base_a, _ = _run(h, a)
    base_b, cache_b = _run(h, b, capture=["projector.out"])
    assert not torch.allclose(base_a, base_b)
    patched, _ = _run(h, a, edits=[Edit("projector.out", "patch", cache_b["projector.out"])])
    assert torch.allclose(patched, base_b, atol=1e-5)
    # a vision-block patch moves the logits too (the tower's output reaches the LM)
    _, cache_vb = _run(h, b, capture=["vision.1"])
    patched_v, _ = _run(h, a, edits=[Edit("vision.1", "patch", cache_vb["vision.1"])])
    assert torch.allclose(patched_v, base_b, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_map_edit_is_bit_identical(family):
    h = _handle(family)
    batch = vlm_inputs(h, [tiny_image(0), tiny_image(1)])
    base, _ = _run(h, batch)
    ident = lambda x: x  # noqa: E731
    edits = [Edit("vision.*", "map", ident), Edit("projector.out", "map", ident), Edit("resid.0", "map", ident),
             Edit("attn.1.z", "map", ident)]
    mapped, _ = _run(h, batch, edits=edits)
    assert torch.equal(mapped, base)
    zeroed, _ = _run(h, batch, edits=[Edit("projector.out", "map", torch.zeros_like)])
    assert not torch.equal(zeroed, base)


@pytest.mark.parametrize("family", CAPTIONERS)
def test_generate_with_pixel_values(family):
    h = _handle(family)
    batch = vlm_inputs(h, [tiny_image(0)])
    with torch.no_grad(), Trace(h, ["projector.out"], pool="mean") as tr:
        out = h.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)
    assert tr.cache["projector.out"].shape == (1, 64)  # the image is encoded once, in the prompt pass
    assert isinstance(h.tokenizer.decode(out[0, -3:]), str)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_round_trip(family, tmp_path):
    h = tiny_vlm(family, tmp_path)
    assert h.kind == "vlm" and type(h.processor).__name__ == PROCESSORS[family]
    assert h.anatomy is not None and isinstance(h.vision, VisionAnatomy)
    assert load(str(tmp_path)).kind == "vlm"  # kind="auto" recognises a VLM directory
    model, _ = tiny_vlm_parts(family)  # same seed: same weights as what was saved
    saved, loaded = model.state_dict(), h.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # the round trip is bit-exact
    batch = vlm_inputs(h, [tiny_image(0)])
    with torch.no_grad():
        # Weights loaded from safetensors are memory-mapped at offsets that are not 64-byte
        # aligned, and CPU BLAS kernels may sum in a different order on unaligned data (CLIP
        # measured 1 ulp apart; cloning the weights makes it bit-identical), so outputs match
        # to float precision, not bit for bit.
        torch.testing.assert_close(_logits(h.model(**batch)), _logits(model(**batch)), rtol=1e-5, atol=1e-6)


def test_vision_sites_on_a_text_model_fail_in_one_line():
    h = tiny_handle("llama")
    for kw in ({"capture": ["vision.0"]}, {"capture": "projector.out"}, {"capture": ["vision.*"]},
               {"edits": [Edit("projector.out", "zero")]}):
        with pytest.raises(ExciseError) as e:
            Trace(h, **kw)
        assert "\n" not in str(e.value) and "vision" in str(e.value)
    with pytest.raises(ExciseError, match="not a vision-language model"):
        h.vision


def test_unsupported_vlm_family_fails_in_one_line():
    cfg = tf.SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, vocab_size=64),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=32, patch_size=8))
    with pytest.raises(ExciseError, match="unsupported vision-language family 'siglip'") as e:
        VisionAnatomy.of(tf.SiglipModel(cfg))
    assert "\n" not in str(e.value)


def test_site_parsing_knows_vision_sites():
    assert parse_site("vision.3").name == "vision.3" and parse_site("projector.out").name == "projector.out"
    with pytest.raises(ExciseError, match="vision.L, projector.out"):
        parse_site("vision")
    with pytest.raises(ExciseError, match="out of range 0..1"):
        parse_site("vision.2", n_layers=8, n_vision_layers=2)
    assert expand_sites("vision.*, projector.out, resid.*", 3, 2) == [
        "vision.0", "vision.1", "projector.out", "resid.0", "resid.1", "resid.2"]
    with pytest.raises(ExciseError, match="n_vision_layers"):
        expand_sites("vision.*", 3)
    with pytest.raises(ExciseError, match="callable"):
        Edit("resid.0", "map", 1.0)


def test_text_models_get_cls_pool_and_map_edits():
    h = tiny_handle("llama")
    batch = h.encode(["hello there", "hi"])
    seen = {}

    def halve(x):
        seen["shape"] = tuple(x.shape)
        return x * 0.5

    with torch.no_grad(), Trace(h, ["resid.1", "attn.0.z"], pool="cls") as tr:
        base = h.model(**batch).logits
    assert tr.cache["resid.1"].shape == (2, 64) and tr.cache["attn.0.z"].shape == (2, 4, 16)
    with torch.no_grad(), Trace(h, edits=[Edit("attn.0.z", "map", halve, heads=[1])]):
        mapped = h.model(**batch).logits
    with torch.no_grad(), Trace(h, edits=[Edit("attn.0.z", "scale", 0.5, heads=[1])]):
        scaled = h.model(**batch).logits
    assert seen["shape"] == (2, batch["input_ids"].shape[1], 4, 16)  # the per-head view
    assert torch.equal(mapped, scaled) and not torch.equal(mapped, base)
    with pytest.raises(ExciseError, match="expected shape"), torch.no_grad(), \
            Trace(h, edits=[Edit("resid.0", "map", lambda x: x[:, :1])]):
        h.model(**batch)


def test_hooks_run_before_transformers_recorders_and_after_earlier_traces():
    h = _handle("llava")
    batch = vlm_inputs(h, [tiny_image(0)])
    with torch.no_grad():
        h.model(**batch, output_hidden_states=True)  # transformers installs its recorders now, before ours
    steer = Trace(h, edits=[Edit("vision.1", "add", 1.0)]).attach()
    try:
        with torch.no_grad(), Trace(h, ["vision.1"]) as tr:
            out = h.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    finally:
        steer.remove()
    assert torch.equal(out.hidden_states[-1], tr.cache["vision.1"])  # both see the earlier trace's edit
    with torch.no_grad():
        plain = h.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    assert torch.allclose(out.hidden_states[-1], plain.hidden_states[-1] + 1.0)


def test_flat_positions_edit_touches_only_those_patches():
    h = _handle("qwen2_vl")
    batch = vlm_inputs(h, [tiny_image(0)])
    _, cache = _run(h, batch, capture=["vision.0"], edits=[Edit("vision.0", "zero", positions=[0, 5])])
    v = cache["vision.0"]
    assert v[[0, 5]].abs().sum() == 0 and (v[1].abs().sum() > 0)


def test_clip_zero_shot_features_and_text_anatomy():
    h = _handle("clip")
    an = Anatomy.of(h.model)  # found under CLIPModel.text_model
    assert an.spec.family == "clip_text" and an.n_layers == 2 and an.d_model == 32 and an.n_heads == 4
    images, texts = [tiny_image(0), tiny_image(1)], ["a photo of a man", "a photo of a woman"]
    batch = vlm_inputs(h, images, texts)
    with torch.no_grad():
        img = h.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        txt = h.model.get_text_features(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).pooler_output
        out = h.model(**batch)
    assert img.shape == (2, 16) and txt.shape == (2, 16)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    assert torch.allclose(out.logits_per_image, h.model.logit_scale.exp() * img @ txt.T, atol=1e-5)
    _, cache = _run(h, batch, capture=["attn.1.z", "mlp.0.out"], pool="last")
    assert cache["attn.1.z"].shape == (2, 4, 8) and cache["mlp.0.out"].shape == (2, 32)
    logits, cache = run_with_cache(h, batch, ["projector.out"])
    assert torch.equal(logits, out.logits_per_image) and cache["projector.out"].shape == (2, 16)


def test_last_vision_layer_gets_gradient():
    h = _handle("llava")
    batch = vlm_inputs(h, [tiny_image(0)])
    with Trace(h, ["vision.1"], detach=False) as tr:
        out = h.model(**batch)
    v = tr.cache["vision.1"]
    v.retain_grad()
    out.logits.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    h.model.zero_grad(set_to_none=True)


def test_handle_vision_is_lazy_and_follows_the_model():
    h = _handle("idefics3")
    assert h.vision is h.vision
    model, _ = tiny_vlm_parts("idefics3", seed=1)
    h2 = h.with_model(model)
    assert h2.vision.model is model and h.vision.model is h.model


def test_smolvlm_vision_anatomy_without_processor():
    cfg = tf.SmolVLMConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8),
                           text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            vocab_size=64), scale_factor=2)
    model = tf.SmolVLMForConditionalGeneration(cfg)
    va = VisionAnatomy.of(model)
    assert va.describe()["modules"] == {"layers": "model.vision_model.encoder.layers", "projector": "model.connector"}
    assert va.d_proj == 64 and Anatomy.of(model).n_layers == 2


def test_load_text_dir_as_vlm_fails(tmp_path):
    save_tiny("llama", tmp_path)
    with pytest.raises(ExciseError, match="no vision_config"):
        load(str(tmp_path), kind="vlm")
