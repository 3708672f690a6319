"""Caption gender bias: extract -> sae -> locate -> before -> lora -> sae_edit -> report, one resumable run.

Stages (folders of the run directory):

* ``data``: the pools (ids, counts by context x gender x visibility) and a check that they are
  disjoint (ids and image bytes): the organism's scenes, ``locate``, ``mitigate``, ``eval``.
* ``extract``: activations of the ``locate`` images at vision-tower blocks, the projector and the
  language model's residuals, pooled, in shards with a manifest and one record per sample
  (:func:`excise.trace_store.trace_images`), plus the SAE site's per-token activations.
* ``sae``: a sparse autoencoder on the SAE site (80% of the locate images; metrics on the other
  20%): L0, explained variance, dead share, and the caption loss with its reconstruction spliced
  in (loss recovered vs zero-ablation). Saved in SAELens' format.
* ``locate``: AUROC of every latent against the scene's gender (bootstrap CIs) and the gender
  latents; activation patching from each scene's gender-swapped twin into the scene, site by
  site, as the share of the twin's caption preference it carries over.
* ``before``, ``lora``, ``sae_edit``: captions of the held-out ``eval`` scenes in every language
  by the model, by the gender-swap LoRA model, and by the model with the gender latents edited
  (ablated or clamped through a ``Trace`` edit); gender accuracy by stereotype, the bias gap,
  gendered wording on hidden-cue scenes, BLEU and ROUGE-L, each with n and a 95% CI.
* ``report``: the before/after table per language, example images with their captions, the SAE
  metrics, the gender latents and the patching map.

A contrastive model (CLIP: no ``generate``, :func:`excise.trace_store.is_contrastive`) writes no
caption, so the same stages measure its zero-shot gender reading instead
(:mod:`excise.locate.clip_probe`: image embedding vs "a photo of a man / woman" prompts):
``extract`` traces vision blocks and ``projector.out`` only (images never pass its text tower);
``sae`` learns the image embeddings ([N, d], one per image) and its splice check is the zero-shot
gender cross-entropy on held-out visible scenes with the reconstruction spliced in vs the
embedding zero-ablated (chance); ``locate`` patches twin into scene at each vision site, as the
share of the twin's change in p(female); ``before`` and ``sae_edit`` score the predicted genders
with :func:`excise.measure.captions.gender_result` (no BLEU / ROUGE: there is no text); ``lora``
is skipped with its reason (the gender-swap LoRA trains on caption likelihood).
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from excise.config import validate
from excise.errors import ExciseError
from excise.intervene.caption_lora import gender_swap_lora
from excise.io import atomic_write_csv, atomic_write_json
from excise.lm import generate_with_images
from excise.locate.caption_patching import patching_map, splice_losses
from excise.locate.clip_probe import zero_shot_gender, zero_shot_patching, zero_shot_splice
from excise.locate.sae import load_sae, save_sae, top_gender_latents
from excise.locate.sae_train import sae_metrics, train_sae
from excise.measure.captions import CaptionItem, caption_gender_result, caption_quality_result, gender_result
from excise.measure.frame import GroupedResult
from excise.models import load
from excise.organisms.caption_vlm import build_caption_organism
from excise.recipes.caption_config import CaptionBiasConfig, quick_variant
from excise.recipes.caption_report import write_report
from excise.report.html import end_of_run
from excise.run import Run, seed_everything
from excise.tasks.caption_prompts import caption_prompt, image_size
from excise.tasks.caption_lexicon import infer_gender
from excise.tasks.captions import CaptionRecord, Scene, image_digest, load_caption_folder, make_scenes
from excise.trace import Edit, Trace
from excise.trace_store import ActivationStore, is_contrastive, trace_images


def load_model(cfg: CaptionBiasConfig, console: Any = None) -> Any:
    """The organism (built once, cached) or the user's VLM (hub id or directory)."""
    if cfg.model == "organism":
        if console is not None:
            console.print("caption organism: building or loading from the cache", markup=False)
        return load(str(build_caption_organism(cfg.organism)), kind="vlm", device=cfg.device, dtype=cfg.dtype)
    return load(cfg.model, kind="vlm", device=cfg.device, dtype=cfg.dtype)


def scene_pools(cfg: CaptionBiasConfig) -> dict[str, list[Any]]:
    """The three workflow pools: synthetic scenes (``locate`` and ``eval`` balanced, so context is
    independent of gender) or a caption folder split by ``seed`` (a quarter each to locate and
    mitigate, half to eval, each capped by its ``n_*``)."""
    if cfg.data is not None:
        return folder_pools(cfg)
    o = cfg.organism
    return {"locate": make_scenes("locate", cfg.n_locate, stereotype_rate=None, ambiguous_rate=0.0,
                                  cue_typicality=o.cue_typicality, seed=cfg.seed),
            "mitigate": make_scenes("mitigate", cfg.n_mitigate, stereotype_rate=o.stereotype_rate,
                                    ambiguous_rate=o.ambiguous_rate, cue_typicality=o.cue_typicality, seed=cfg.seed),
            "eval": make_scenes("eval", cfg.n_eval, stereotype_rate=None, ambiguous_rate=cfg.eval_hidden_rate,
                                cue_typicality=o.cue_typicality, seed=cfg.seed)}


def folder_pools(cfg: CaptionBiasConfig) -> dict[str, list[CaptionRecord]]:
    """A user's caption folder, split into disjoint pools; a row without a gender label gets the
    gender its English reference names (lexicon), or counts as hidden-cue when it names none."""
    recs = load_caption_folder(cfg.data)
    out = []
    for r in recs:
        if r.gender is None:
            g = infer_gender(r.en_caption, "en")
            r = dataclasses.replace(r, gender=g if g in ("male", "female") else None,
                                    visible=r.visible and g in ("male", "female"))
        out.append(r)
    random.Random(cfg.seed).shuffle(out)
    q = len(out) // 4
    if q == 0:
        raise ExciseError(f"{cfg.data}: {len(out)} rows are too few to split into locate / mitigate / eval pools")
    return {"locate": out[:q][:cfg.n_locate], "mitigate": out[q:2 * q][:cfg.n_mitigate], "eval": out[2 * q:][:cfg.n_eval]}


def caption_items(scenes: Sequence[Any], lang: str) -> list[CaptionItem]:
    return [CaptionItem(s.context or "unknown", s.gender if s.visible else None, s.stereotype, s.visible, lang)
            for s in scenes]


def generate_captions(handle: Any, scenes: Sequence[Any], lang: str, cfg: CaptionBiasConfig,
                      edits: Sequence[Edit] = ()) -> list[str]:
    size = image_size(handle.processor)
    prompts = [caption_prompt(handle.processor, lang)] * len(scenes)
    with Trace(handle, edits=list(edits)) if edits else nullcontext():
        # one image list per prompt: every family's processor takes it, SmolVLM's only this
        return generate_with_images(handle, prompts, [[s.image(size)] for s in scenes],
                                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


def evaluate(handle: Any, scenes: Sequence[Any], cfg: CaptionBiasConfig, d: Path, name: str,
             edits: Sequence[Edit] = ()) -> dict:
    """Caption the eval scenes in every language; write captions.csv, gender_<lang>.json, quality.json."""
    hyps, refs, langs, rows, out = [], [], [], [], {}
    for lang in cfg.langs:
        caps = generate_captions(handle, scenes, lang, cfg, edits)
        res = caption_gender_result(caps, caption_items(scenes, lang), n_boot=cfg.n_boot, seed=cfg.seed,
                                    meta={"model": name, "lang": lang})
        res.save(d, f"gender_{lang}")
        out[lang] = _summary(res)
        # references: the caption a perfect captioner writes (the true gender, neutral where hidden)
        ref = [s.caption(lang, neutral_if_hidden=True) for s in scenes]
        hyps += caps
        refs += ref
        langs += [lang] * len(caps)
        rows += [{**_row(s, lang), "caption": c, "reference": r} for s, c, r in zip(scenes, caps, ref)]
    q = caption_quality_result(hyps, refs, langs, n_boot=cfg.n_boot, seed=cfg.seed, meta={"model": name})
    q.save(d, "quality")
    # visible scenes only: references that any labelling convention agrees on (hidden-cue references
    # use the neutral wording, which a model that never learned it cannot match)
    vis = [i for i, lang in enumerate(langs) if scenes[i % len(scenes)].visible]
    qv = caption_quality_result([hyps[i] for i in vis], [refs[i] for i in vis], [langs[i] for i in vis],
                                n_boot=cfg.n_boot, seed=cfg.seed, meta={"model": name, "items": "visible-cue scenes"})
    qv.save(d, "quality_visible")
    for lang in cfg.langs:
        out[lang].update({k: round(e.value, 2) for k, e in q.by_group[lang].items()})
        out[lang].update({f"{k}_visible": round(e.value, 2) for k, e in qv.by_group[lang].items()})
    atomic_write_csv(d / "captions.csv", rows)
    return out


def _row(s: Any, lang: str) -> dict:
    st = s.stereotypical  # a caption folder may leave it unlabelled
    return {"scene_id": s.scene_id, "lang": lang, "context": s.context, "gender": s.gender,
            "visible": int(s.visible), "stereotypical": "" if st is None else int(st)}


def evaluate_zero_shot(handle: Any, scenes: Sequence[Any], cfg: CaptionBiasConfig, d: Path, name: str,
                       edits: Sequence[Edit] = ()) -> dict:
    """A contrastive model's zero-shot gender on the eval scenes in every language; writes
    gender_<lang>.json and captions.csv (the predicted gender and p(female) as the "caption")."""
    size = image_size(handle.processor)
    images = [s.image(size) for s in scenes]
    rows, out = [], {}
    with Trace(handle, edits=list(edits)) if edits else nullcontext():
        for lang in cfg.langs:
            pred, p = zero_shot_gender(handle, images, lang, batch_size=cfg.batch_size)
            res = gender_result(pred, caption_items(scenes, lang), n_boot=cfg.n_boot, seed=cfg.seed,
                                meta={"model": name, "lang": lang, "probe": "zero-shot (clip_probe.gender_prompts)"},
                                rule="visible scene correct iff the zero-shot prediction is the true gender")
            res.save(d, f"gender_{lang}")
            out[lang] = _summary(res)
            female = [v for s, v in zip(scenes, p) if s.visible and s.gender == "female"]
            male = [v for s, v in zip(scenes, p) if s.visible and s.gender == "male"]
            out[lang].update({"mean_p_female_female": round(float(np.mean(female)), 4) if female else float("nan"),
                              "mean_p_female_male": round(float(np.mean(male)), 4) if male else float("nan")})
            rows += [{**_row(s, lang), "caption": f"{g} (p_female={v:.2f})", "predicted": g, "p_female": float(v)}
                     for s, g, v in zip(scenes, pred, p)]
    atomic_write_csv(d / "captions.csv", rows)
    return out


def _summary(res: GroupedResult) -> dict:
    keys = ("gender_accuracy", "accuracy_stereotypical", "accuracy_counter_stereotypical", "ambiguous_gendered_rate")
    out = {k: round(res.overall[k].value, 4) for k in keys if k in res.overall}
    out.update({k: round(e.value, 4) for k, e in res.differences.items()})
    return out


def _check_disjoint(pools: dict[str, list[Any]], organism: list[Scene], size: int) -> dict:
    """Ids (and scene seeds) never shared; eval images never pixel-identical to a building image.

    A pixel match is reported, not raised: two rows of a user's folder may hold the same photo."""
    named = {"organism": organism, **pools}
    ids = {k: {s.scene_id for s in v} for k, v in named.items()}
    seeds = {k: {getattr(s, "seed", None) for s in v} - {None} for k, v in named.items()}
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if ids[a] & ids[b] or seeds[a] & seeds[b]:
                raise ExciseError(f"item pools '{a}' and '{b}' share items")
    # image bytes: held-out scenes must not be pixel-identical to any scene that built or tuned anything
    built = {image_digest(s.image(size)) for k in ("organism", "mitigate", "locate") for s in named[k]}
    shared = sum(image_digest(s.image(size)) in built for s in pools["eval"])
    return {"disjoint_ids": True, "eval_images_identical_to_build_images": shared}


def _counts(scenes: Sequence[Any]) -> dict:
    out: dict[str, int] = {}
    for s in scenes:
        k = f"{s.context or 'unknown'}/{s.gender or 'unknown'}/{'visible' if s.visible else 'hidden'}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def run_captions(cfg: CaptionBiasConfig, out: str | Path, *, force: bool = False, console: Any = None,
                 stop_after: str | None = None) -> dict:
    """Run (or resume) the workflow; ``stop_after`` ends it after that stage."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(out, {"workflow": "captions", **cfg.model_dump(mode="json")}, force=force)
    seed_everything(cfg.seed)
    pools = scene_pools(cfg)  # a user's caption folder is checked before the model is built or loaded
    handle = load_model(cfg, console)
    size = image_size(handle.processor)
    site = cfg.sae.site
    clip = is_contrastive(handle)
    score = evaluate_zero_shot if clip else evaluate
    res: dict[str, Any] = {"dir": str(run.dir)}

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)

    def st_data(d: Path) -> dict:
        organism = (make_scenes("organism", cfg.organism.n_scenes, stereotype_rate=cfg.organism.stereotype_rate,
                                ambiguous_rate=cfg.organism.ambiguous_rate, cue_typicality=cfg.organism.cue_typicality,
                                seed=cfg.organism.seed) if cfg.model == "organism" else [])
        check = _check_disjoint(pools, organism, size)
        return {"n": {k: len(v) for k, v in pools.items()}, "n_organism": len(organism),
                "counts": {k: _counts(v) for k, v in pools.items()}, **check}

    def st_extract(d: Path) -> dict:
        scenes, e = pools["locate"], cfg.extract
        images = [s.image(size) for s in scenes]
        # CLIP: images never pass its text tower, so language-model sites are dropped and no prompt is used
        prompts = None if clip else [caption_prompt(handle.processor, cfg.langs[0])] * len(scenes)
        sites = [x for x in e.sites if x.startswith(("vision.", "projector."))] if clip else e.sites
        samples = [{"id": s.scene_id, "context": s.context, "gender": s.gender, "visible": s.visible,
                    "stereotypical": s.stereotypical, **{f"{lang}_caption": s.caption(lang) for lang in cfg.langs}}
                   for s in scenes]
        pooled = trace_images(handle, prompts, images, sites, d / "pooled", pool=e.pool, batch_size=e.batch_size,
                              shard_size=e.shard_size, samples=samples, progress=console is not None)
        tokens = trace_images(handle, prompts, images, [site], d / "tokens", pool="all", batch_size=e.batch_size,
                              shard_size=e.shard_size, samples=samples, progress=False)
        return {"n_samples": len(pooled), "sites": pooled.sites, "shapes": pooled.manifest["shapes"],
                "token_site": site, "token_shape": tokens.manifest["shapes"][site]}

    def st_sae(d: Path) -> dict:
        store = ActivationStore(run.stage_dir("extract") / "tokens")
        acts = store.load(site)  # [N, T, d] per-token activations ([N, d] for CLIP's image embedding)
        n_train = int(round(0.8 * acts.shape[0]))
        train = acts[:n_train].reshape(-1, acts.shape[-1])
        sae, hist = train_sae(train, cfg.sae.sae)
        metrics = sae_metrics(sae, acts[n_train:].reshape(-1, acts.shape[-1]))
        held = pools["locate"][n_train:]
        splice = (zero_shot_splice(handle, held, cfg.langs, site, sae, size=size, batch_size=cfg.batch_size) if clip
                  else splice_losses(handle, held, cfg.langs, site, sae, batch_size=cfg.batch_size))
        save_sae(sae, d / "sae", hook_name=site, model_name=handle.name, config=cfg.sae.sae)
        return {"site": site, "n_train_images": n_train, "n_heldout_images": len(held),
                "n_train_vectors": int(train.shape[0]), "train_seconds": hist.get("wall_s"),
                "metrics": metrics, "splice": splice}

    def st_locate(d: Path) -> dict:
        sae = load_sae(run.stage_dir("sae") / "sae")
        acts = ActivationStore(run.stage_dir("extract") / "tokens").load(site)
        scenes = pools["locate"]
        with torch.no_grad():
            lat = sae.encode(acts)
            lat = (lat.mean(1) if lat.dim() == 3 else lat).numpy()  # per image: mean latent over the site's positions
        known = np.asarray([s.visible and s.gender in ("male", "female") for s in scenes])
        lat = lat[known]
        labels = np.asarray([1 if s.gender == "female" else 0 for s, k in zip(scenes, known) if k])
        top = top_gender_latents(lat, labels, top=cfg.sae.top_latents, n_boot=cfg.n_boot, seed=cfg.seed)
        latents = [{"latent": j, "auroc": e.value, "lo": e.lo, "hi": e.hi, "n": e.n,
                    "favours": "female" if e.value > 0.5 else "male",
                    "mean_female": float(lat[labels == 1, j].mean()), "mean_male": float(lat[labels == 0, j].mean())}
                   for j, e in top]
        pairs = [s for s in scenes if s.visible and s.twin() is not None][:cfg.n_patch]  # a caption folder has none
        patch = zero_shot_patching if clip else patching_map
        pm = patch(handle, pairs, cfg.langs[0], size=size, batch_size=cfg.batch_size, n_boot=cfg.n_boot, seed=cfg.seed)
        atomic_write_json(d / "patching.json", pm)
        return {"site": site, "n_images": int(known.sum()), "gender_latents": latents,
                "n_latents_ci_excludes_half": len(top_gender_latents(lat, labels, n_boot=cfg.n_boot, seed=cfg.seed)),
                "patching": pm}

    def sae_edit_stage(d: Path) -> dict:
        sae = load_sae(run.stage_dir("sae") / "sae")
        latents = run.stage("locate", st_locate).metrics["gender_latents"]
        if not latents:  # an honest outcome, not an error: the report says so
            return {"edit": cfg.sae.edit, "latents": [], "skipped": "no latent's AUROC CI excludes 0.5"}
        idx = torch.tensor([r["latent"] for r in latents])
        target = torch.tensor([(r["mean_female"] + r["mean_male"]) / 2 for r in latents])
        edit = latent_edit(sae, site, idx, target if cfg.sae.edit == "clamp" else torch.zeros_like(target))
        m = score(handle, pools["eval"], cfg, d, f"{handle.name}+sae-{cfg.sae.edit}", [edit])
        return {"edit": cfg.sae.edit, "latents": idx.tolist(), **m}

    def lora_stage(d: Path) -> dict:
        if clip:
            return {"skipped": "a contrastive model writes no caption: the gender-swap LoRA trains on caption "
                               "likelihood, which CLIP does not define"}
        h2, info = gender_swap_lora(handle, pools["mitigate"], cfg.langs, cfg.mitigate, size=size,
                                    progress=console is not None, checkpoint_dir=run.checkpoint_dir("lora"))
        return {"training": info, **evaluate(h2, pools["eval"], cfg, d, h2.name)}

    stages = [("data", st_data), ("extract", st_extract), ("sae", st_sae), ("locate", st_locate),
              ("before", lambda d: score(handle, pools["eval"], cfg, d, handle.name)),
              ("lora", lora_stage), ("sae_edit", sae_edit_stage),
              ("report", lambda d: write_report(run.dir, d, cfg, pools["eval"], size, contrastive=clip))]
    res.update(run.run_stages(stages, say=say, stop_after=stop_after))
    if "report" in res:
        say((run.stage_dir("report") / "report.md").read_text(encoding="utf-8"))
    res["report_html"] = end_of_run(run.dir, console)
    return res


def latent_edit(sae: Any, site: str, latents: torch.Tensor, values: torch.Tensor) -> Edit:
    """A ``map`` edit that sets some SAE latents to fixed values and keeps the SAE's error term.

    x -> x + (z' - z) W_dec[latents]: only the chosen latents' contribution changes, so whatever
    the SAE does not reconstruct passes through untouched.
    """
    w = sae.W_dec.detach()[latents]  # [k, d]

    def fn(x: torch.Tensor) -> torch.Tensor:
        z = sae.encode(x)[..., latents]
        delta = (values.to(z.dtype) - z) @ w.to(z.dtype)
        return x + delta.to(x.dtype)

    return Edit(site, "map", fn)


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(CaptionBiasConfig, settings, source)
    return run_captions(quick_variant(cfg) if quick else cfg, out, force=force, console=console)
