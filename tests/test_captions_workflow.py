"""The caption workflow: scenes, pools, the organism, extraction, edits, and a quick end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from excise.errors import ExciseError
from excise.tasks.captions import (CONTEXTS, caption, image_digest, load_caption_folder, make_scenes, render,
                                   write_caption_folder)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """A tiny organism built through the real code path (cache in a temp dir)."""
    import os

    from excise.models import load
    from excise.organisms.caption_vlm import CaptionOrganismConfig, build_caption_organism

    old = os.environ.get("EXCISE_CACHE")
    os.environ["EXCISE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        d = build_caption_organism(CaptionOrganismConfig(n_scenes=64, steps=4, batch_size=16))
        yield load(str(d), kind="vlm")
    finally:
        if old is None:
            os.environ.pop("EXCISE_CACHE", None)
        else:
            os.environ["EXCISE_CACHE"] = old


def test_captions_agree_in_both_languages():
    assert caption("kitchen", "female", "en") == "a woman is cooking food in the kitchen"
    assert caption("kitchen", "female", "ar") == "امرأة تطبخ الطعام في المطبخ"
    assert caption("garage", "male", "ar") == "رجل يصلح السيارة في المرآب"
    assert caption("garage", "person", "ar").startswith("شخص يصلح")  # neutral noun, masculine agreement
    with pytest.raises(ExciseError):
        caption("moon", "male", "en")


def test_scenes_are_seeded_balanced_and_twins_change_only_the_cue():
    a, b = make_scenes("eval", 64, stereotype_rate=None, seed=3), make_scenes("eval", 64, stereotype_rate=None, seed=3)
    assert a == b
    for ctx in CONTEXTS:  # balanced: half of each context per gender
        genders = [s.gender for s in a if s.context == ctx]
        assert genders.count("male") == genders.count("female")
    s = next(x for x in a if x.visible)
    t = s.twin()
    assert (t.gender != s.gender, t.long_hair != s.long_hair, t.dress != s.dress, t.context) == (True, True, True, s.context)
    x, y = np.asarray(render(s)), np.asarray(render(t))
    assert image_digest(render(s)) == image_digest(render(s))  # deterministic
    diff = (x != y).any(-1)
    assert diff.any() and diff.mean() < 0.2  # only the figure's hair / outfit pixels change
    biased = make_scenes("organism", 2000, stereotype_rate=0.85, seed=0)
    rate = np.mean([sc.stereotypical for sc in biased])
    assert 0.82 < rate < 0.88


def test_pools_are_disjoint_by_id_and_pixels():
    """Items that build (organism), tune (mitigate) or locate never appear among the reported (eval)."""
    pools = {p: make_scenes(p, 400, seed=0) for p in ("organism", "mitigate", "locate", "eval")}
    ids = [{s.scene_id for s in v} for v in pools.values()]
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j]
    built = {image_digest(render(s)) for p in ("organism", "mitigate", "locate") for s in pools[p]}
    held = [image_digest(render(s)) for s in pools["eval"]]
    assert sum(h in built for h in held) == 0


def test_caption_folder_round_trip_and_bad_rows(tmp_path):
    scenes = make_scenes("eval", 8, stereotype_rate=None, seed=0)
    d = write_caption_folder(tmp_path / "f", scenes)
    recs = load_caption_folder(d)
    assert [r.scene_id for r in recs] == [s.scene_id for s in scenes]
    assert recs[0].ar_caption == scenes[0].caption("ar") and recs[0].gender == scenes[0].gender
    csv = (d / "image_caption.csv").read_text(encoding="utf-8").splitlines()
    csv[3] = csv[3].replace(",male,", ",robot,").replace(",female,", ",robot,")
    (d / "image_caption.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    with pytest.raises(ExciseError, match=r"image_caption.csv:4:gender"):
        load_caption_folder(d)
    with pytest.raises(ExciseError, match="not a caption folder"):
        load_caption_folder(tmp_path)


def test_organism_processor_and_batches(organism):
    from excise.tasks.caption_prompts import caption_batch, caption_prompt, prompt_ids

    proc = organism.processor
    ids = prompt_ids(proc, "ar")
    image_id = organism.model.config.image_token_id
    assert ids.count(image_id) == 16  # (32 / 8)^2 patches, CLS dropped: the processor expanded <image>
    assert caption_prompt(proc, "en") == "<s><image><en>"
    b = caption_batch(proc, [("en", "a man is cooking food in the kitchen"), ("ar", "رجل يطبخ الطعام في المطبخ")])
    lab = b["labels"]
    assert (lab[:, : len(ids)] == -100).all()  # no loss on the prompt
    assert proc.tokenizer.decode(lab[1][lab[1] != -100]) == "رجل يطبخ الطعام في المطبخ </s>"


def test_generation_trace_and_latent_edit(organism):
    from excise.lm import generate_with_images
    from excise.locate.sae_train import SAEConfig, train_sae
    from excise.recipes.caption_bias import latent_edit
    from excise.tasks.caption_prompts import caption_prompt
    from excise.trace import Trace

    scenes = make_scenes("eval", 4, stereotype_rate=None, seed=0)
    imgs = [render(s) for s in scenes]
    caps = generate_with_images(organism, [caption_prompt(organism.processor, "en")] * 4, imgs, max_new_tokens=6)
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)
    enc = organism.processor(text=[caption_prompt(organism.processor, "en")] * 4, images=imgs, return_tensors="pt")
    with torch.no_grad(), Trace(organism, ["projector.out", "vision.*", "resid.0"]) as tr:
        ref = organism.model(**enc).logits
    assert tr.cache["projector.out"].shape == (4, 16, 64) and tr.cache["vision.1"].shape[0] == 4
    sae, _ = train_sae(tr.cache["projector.out"].reshape(-1, 64), SAEConfig(k=4, epochs=2))
    with torch.no_grad():
        z = sae.encode(tr.cache["projector.out"])
    idx = torch.tensor([0, 1])
    # setting latents to the values they already have is the identity (the SAE's error term is kept)
    same = latent_edit(sae, "projector.out", idx, z[..., idx])
    with torch.no_grad(), Trace(organism, edits=[same]):
        out = organism.model(**enc).logits
    assert torch.allclose(out, ref, atol=1e-5)


def test_trace_images_resumes_after_a_kill(organism, tmp_path, monkeypatch):
    from excise.tasks.caption_prompts import caption_prompt
    from excise.trace_store import trace_images

    scenes = make_scenes("locate", 12, stereotype_rate=None, seed=0)
    imgs, prompts = [render(s) for s in scenes], [caption_prompt(organism.processor, "en")] * 12
    ref = trace_images(organism, prompts, imgs, ["projector.out", "resid.*", "vision.0"], tmp_path / "a",
                       batch_size=4, shard_size=4, samples=[{"id": s.scene_id} for s in scenes], progress=False)
    calls = {"n": 0}
    real = organism.model.forward

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the third batch
        return real(*a, **k)

    monkeypatch.setattr(organism.model, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        trace_images(organism, prompts, imgs, ["projector.out", "resid.*", "vision.0"], tmp_path / "b",
                     batch_size=4, shard_size=4, progress=False)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "progress.json").exists()
    monkeypatch.setattr(organism.model, "forward", real)
    done = trace_images(organism, prompts, imgs, ["projector.out", "resid.*", "vision.0"], tmp_path / "b",
                        batch_size=4, shard_size=4, progress=False)
    for site in ref.sites:
        assert torch.equal(ref.load(site), done.load(site))
    assert ref.samples()[3]["id"] == scenes[3].scene_id
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["pools"]["resid.0"] == "image" and manifest["n_samples"] == 12


def test_quick_workflow_end_to_end(tmp_path, monkeypatch):
    """Every stage on a smoke-sized organism; the report names every section; a re-run resumes."""
    from excise.recipes.caption_bias import run_captions
    from excise.recipes.caption_config import CaptionBiasConfig, quick_variant

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    cfg = quick_variant(CaptionBiasConfig(threads=1))
    res = run_captions(cfg, tmp_path / "run")
    assert res["data"]["eval_images_identical_to_build_images"] == 0
    for stage in ("extract", "sae", "locate", "before", "lora", "sae_edit", "report"):
        assert (tmp_path / "run" / stage / "stage.json").exists()
    report = (tmp_path / "run" / "report" / "report.md").read_text(encoding="utf-8")
    for section in ("Before and after (en)", "Before and after (ar)", "Sparse autoencoder", "Gender latents",
                    "activation patching", "Examples"):
        assert section in report
    gender = json.loads((tmp_path / "run" / "before" / "gender_ar.json").read_text(encoding="utf-8"))
    assert gender["overall"]["gender_accuracy"]["n"] > 0
    again = run_captions(cfg, tmp_path / "run")  # resumes: nothing recomputed
    assert again["before"] == res["before"]


def test_bad_config_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "excise.cli", "captions", "eval", "--out", str(tmp_path / "x"),
                        "--set", "langs=[fr]"], capture_output=True, text=True, timeout=180)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "langs" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
