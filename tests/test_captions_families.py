"""The caption workflow's pieces on every tiny VLM family, CLIP's zero-shot gender probe, and two
end-to-end runs that are not the organism: a saved tiny CLIP directory and a user caption folder."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from excise.lm import generate_with_images
from excise.locate.caption_patching import patching_map, splice_losses
from excise.locate.clip_probe import gender_prompts, zero_shot_gender
from excise.locate.sae_train import SAEConfig, train_sae
from excise.recipes.caption_bias import run_captions
from excise.recipes.caption_config import CaptionBiasConfig, quick_variant
from excise.tasks.caption_prompts import caption_prompt
from excise.tasks.captions import make_scenes, write_caption_folder
from excise.testing import CAPTION_FAMILIES, tiny_captioner, tiny_vlm
from excise.trace import Edit, Trace
from excise.trace_store import is_contrastive, trace_images

NEEDS_NUM2WORDS = pytest.mark.skipif(importlib.util.find_spec("num2words") is None,
                                     reason="SmolVLM's processor needs num2words")
FAMILIES = [pytest.param(f, marks=NEEDS_NUM2WORDS) if f == "smolvlm" else f for f in CAPTION_FAMILIES]
SCENES = make_scenes("eval", 4, stereotype_rate=None, ambiguous_rate=0.0, seed=0)
_CACHE: dict[str, object] = {}


def _handle(family):
    if family not in _CACHE:
        _CACHE[family] = tiny_vlm("clip") if family == "clip" else tiny_captioner(family)
    return _CACHE[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_family_traces_pooled_sites_and_generates(family, tmp_path):
    h = _handle(family)
    prompt = caption_prompt(h.processor, "en")
    images = [s.image(32) for s in SCENES]
    store = trace_images(h, [prompt] * 4, images, ["vision.*", "projector.out", "resid.*"], tmp_path / "acts",
                         pool="image", batch_size=2, shard_size=2, progress=False)
    shapes = store.manifest["shapes"]
    # pool="image": one vector per image at every site, flat (Qwen2-VL) layouts pooled per image too
    assert shapes == {"vision.0": [32], "vision.1": [32], "projector.out": [64], "resid.0": [64], "resid.1": [64]}
    assert all(store.load(s).shape[0] == 4 for s in store.sites)
    # one image list per prompt (SmolVLM's processor refuses a flat list of images)
    caps = generate_with_images(h, [prompt] * 4, [[im] for im in images], max_new_tokens=3, batch_size=2)
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_all_pooling_keeps_one_row_per_image(family, tmp_path):
    h = _handle(family)
    images = [s.image(32) for s in SCENES]
    store = trace_images(h, [caption_prompt(h.processor, "en")] * 4, images, ["vision.0", "projector.out"],
                         tmp_path / "acts", pool="all", progress=False)
    assert store.load("vision.0").shape == (4, 16, 32) and store.load("projector.out").shape == (4, 4, 64)


def test_llava_patching_map_and_splice_losses():
    h = _handle("llava")
    pm = patching_map(h, SCENES[:2], "en", size=32, n_boot=100)
    assert pm["n_pairs"] == 2 and set(pm["sites"]) >= {"vision.0", "projector.out", "resid.1"}
    assert abs(pm["sites"]["projector.out"]["share"] - 1.0) < 1e-4  # everything the caption sees of the image
    with torch.no_grad(), Trace(h, ["projector.out"]) as tr:
        h.model(**h.processor(text=[caption_prompt(h.processor, "en")] * 4, images=[s.image(32) for s in SCENES],
                              return_tensors="pt"))
    sae, _ = train_sae(tr.cache["projector.out"].reshape(-1, 64), SAEConfig(k=4, d_sae=16, epochs=2))
    sp = splice_losses(h, SCENES[:2], ["en", "ar"], "projector.out", sae)
    assert sp["n_captions"] == 4 and np.isfinite([sp["loss_clean"], sp["loss_sae"], sp["loss_zero_ablation"]]).all()


def test_clip_zero_shot_gender_and_an_edit_at_the_embedding():
    h = _handle("clip")
    assert is_contrastive(h) and not is_contrastive(_handle("llava"))
    scenes = make_scenes("eval", 8, stereotype_rate=None, ambiguous_rate=0.0, seed=1)
    images = [s.image(32) for s in scenes]
    pred, p = zero_shot_gender(h, images, batch_size=3)
    assert len(pred) == 8 and set(pred) <= {"male", "female", "none"} and ((p >= 0) & (p <= 1)).all()
    assert [("female" if v > 0.5 else "male") for v in p] == pred
    # an SAE-style map edit that zeroes the image embedding: no evidence left, p(female) = 0.5
    with Trace(h, edits=[Edit("projector.out", "map", torch.zeros_like)]):
        _, p0 = zero_shot_gender(h, images)
    assert not np.allclose(p0, p) and np.allclose(p0, 0.5)
    _, p1 = zero_shot_gender(h, images, edits=[Edit("vision.1", "scale", 0.0)])
    assert not np.allclose(p1, p)
    assert gender_prompts("ar")["female"][0] == "صورة امرأة"
    _, p_ar = zero_shot_gender(h, images, "ar")  # the tiny tokenizer knows no Arabic: a tie
    assert np.allclose(p_ar, 0.5)
    with pytest.raises(Exception, match="no zero-shot gender prompts"):
        gender_prompts("fr")


def test_clip_trace_images_drops_nothing_it_cannot_trace(tmp_path):
    h = _handle("clip")
    images = [s.image(32) for s in SCENES]
    store = trace_images(h, None, images, ["vision.*", "projector.out"], tmp_path / "a", progress=False)
    assert store.manifest["shapes"] == {"vision.0": [32], "vision.1": [32], "projector.out": [16]}
    with pytest.raises(Exception, match="text tower"):
        trace_images(h, None, images, ["resid.0"], tmp_path / "b", progress=False)


def _quick(**kw):
    cfg = quick_variant(CaptionBiasConfig(threads=1, **kw))
    return cfg.model_copy(update={"n_eval": 16, "n_locate": 24, "n_mitigate": 16, "n_patch": 4, "n_boot": 100})


def test_run_captions_on_a_tiny_clip_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    tiny_vlm("clip", tmp_path / "clip")
    cfg = _quick(model=str(tmp_path / "clip"))
    res = run_captions(cfg, tmp_path / "run")
    assert res["lora"] == {"skipped": res["lora"]["skipped"]} and "caption" in res["lora"]["skipped"]
    assert res["extract"]["sites"] == ["vision.0", "vision.1", "projector.out"]  # no language-model sites
    assert res["extract"]["token_shape"] == [16]  # one image embedding per image
    assert res["sae"]["splice"]["metric"].startswith("zero-shot gender cross-entropy")
    assert res["locate"]["patching"]["measure"] == "p_female" and res["locate"]["patching"]["n_pairs"] > 0
    gender = json.loads((tmp_path / "run" / "before" / "gender_en.json").read_text(encoding="utf-8"))
    assert gender["overall"]["gender_accuracy"]["n"] > 0
    report = (tmp_path / "run" / "report" / "report.md").read_text(encoding="utf-8")
    assert "gender-swap LoRA: skipped" in report and "zero-shot" in report and "n/a" in report
    assert "Sparse autoencoder" in report and "activation patching" in report


def test_run_captions_on_a_caption_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    folder = write_caption_folder(tmp_path / "folder", make_scenes("eval", 40, stereotype_rate=None, seed=5))
    cfg = _quick(data=str(folder))
    cfg = cfg.model_copy(update={"organism": cfg.organism.model_copy(update={"n_scenes": 64, "steps": 4})})
    res = run_captions(cfg, tmp_path / "run")
    assert res["data"]["n"] == {"locate": 10, "mitigate": 10, "eval": 16}
    assert res["locate"]["patching"]["n_pairs"] == 0  # photographs have no twins
    report = (tmp_path / "run" / "report" / "report.md").read_text(encoding="utf-8")
    assert "0 scene/twin pairs" in report and "Before and after (ar)" in report


def test_gender_result_scores_predictions_as_caption_gender_result_scores_captions():
    from excise.measure.captions import CaptionItem, caption_gender_result, gender_result
    from excise.tasks.caption_lexicon import infer_gender

    items = [CaptionItem("kitchen", "female", "female"), CaptionItem("garage", "female", "male"),
             CaptionItem("garage", "male", "male"), CaptionItem("kitchen", None, "female", visible=False)]
    caps = ["a woman is cooking", "a man is fixing a car", "a person", "a woman"]
    a = caption_gender_result(caps, items, n_boot=100)
    b = gender_result([infer_gender(c) for c in caps], items, n_boot=100)
    assert a.overall == b.overall and a.by_group == b.by_group and a.differences == b.differences
    with pytest.raises(Exception, match="predicted gender 'robot'"):
        gender_result(["robot"] * 4, items)
