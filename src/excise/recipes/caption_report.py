"""The caption workflow's report: before/after per language, examples, SAE metrics, gender latents,
the patching map. Written as report.md (+ report.json, PNGs) into the report stage's folder.

Every model column and metric row is always shown: a stage that was skipped (its reason is
printed) or a metric a model does not have (BLEU for CLIP, which writes no caption) reads n/a."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from excise.io import atomic_write_json, atomic_write_text, read_json
from excise.measure.frame import GroupedResult
from excise.report.plots import lines
from excise.tasks.captions import Scene

MODELS = (("before", "organism (before)"), ("lora", "gender-swap LoRA"), ("sae_edit", "SAE latent edit"))
GENDER_ROWS = (("gender_accuracy", "overall", "gender accuracy, visible scenes"),
               ("accuracy_stereotypical", "overall", "accuracy, stereotypical"),
               ("accuracy_counter_stereotypical", "overall", "accuracy, counter-stereotypical"),
               ("stereotype_gap", "differences", "stereotype gap (stereo - counter)"),
               ("bias_gap", "differences", "bias gap (male - female)"),
               ("ambiguous_gendered_rate", "overall", "hidden cue: caption names a gender"),
               ("ambiguous_stereotype_rate", "overall", "hidden cue: names the context's stereotype"))


def _fmt(e: Any, scale: float = 100.0) -> str:
    if e is None or e.n == 0 or math.isnan(e.value):
        return "n/a"
    return f"{scale * e.value:.1f} [{scale * e.lo:.1f}, {scale * e.hi:.1f}]"


def _load(run_dir: Path, stage: str, name: str) -> GroupedResult | None:
    p = run_dir / stage / f"{name}.json"
    return GroupedResult.from_dict(read_json(p)) if p.exists() else None


def _num(v: Any, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _models(cfg: Any) -> tuple[tuple[str, str], ...]:
    return tuple((s, "model (before)" if s == "before" and cfg.model != "organism" else label) for s, label in MODELS)


def _table(run_dir: Path, lang: str, models: Sequence[tuple[str, str]]) -> tuple[list[str], dict]:
    present = list(models)
    head = "| metric (x100, 95% CI) | " + " | ".join(label for _, label in present) + " |"
    out = [head, "|---" * (len(present) + 1) + "|"]
    data: dict[str, dict] = {s: {} for s, _ in present}
    n = None
    for key, part, label in GENDER_ROWS:
        cells = []
        for s, _ in present:
            res = _load(run_dir, s, f"gender_{lang}")
            e = getattr(res, part).get(key) if res else None
            n = n or (res.overall["gender_accuracy"].n if res and "gender_accuracy" in res.overall else None)
            cells.append(_fmt(e))
            data[s][key] = None if e is None or e.n == 0 else {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, file, label in (("bleu", "quality", "BLEU (0-100)"), ("rouge_l", "quality", "ROUGE-L F (0-100)"),
                             ("bleu", "quality_visible", "BLEU, visible scenes"),
                             ("rouge_l", "quality_visible", "ROUGE-L F, visible scenes")):
        cells = []
        for s, _ in present:
            q = _load(run_dir, s, file)
            e = q.by_group.get(lang, {}).get(key) if q else None
            cells.append(_fmt(e, 1.0))
            name = key if file == "quality" else f"{key}_visible"
            data[s][name] = None if e is None or e.n == 0 else {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out, {"n_visible": n, "models": data}


def _examples(run_dir: Path, d: Path, scenes: Sequence[Scene], size: int, models: Sequence[tuple[str, str]],
              k: int = 8) -> list[str]:
    """k eval scenes (counter-stereotypical and hidden first) with their captions per model."""
    caps: dict[tuple[str, str, str], str] = {}
    for s, _ in models:
        p = run_dir / s / "captions.csv"
        if p.exists():
            with open(p, encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    caps[(s, row["scene_id"], row["lang"])] = row["caption"]
    chosen = sorted(scenes, key=lambda s: (bool(s.stereotypical and s.visible), s.scene_id))[:k]
    (d / "examples").mkdir(exist_ok=True)
    out = ["| image | scene | " + " | ".join(label for _, label in models) + " |", "|---" * (len(models) + 2) + "|"]
    for sc in chosen:
        name = f"examples/{sc.scene_id}.png"
        sc.image(size).resize((96, 96), 0).save(d / name)
        what = f"{sc.gender}, {sc.context}, {'visible' if sc.visible else 'hidden'}"
        cells = ["<br>".join(caps.get((s, sc.scene_id, lang), "") for lang in ("en", "ar"))
                 if any((s, sc.scene_id, lang) in caps for lang in ("en", "ar")) else "n/a" for s, _ in models]
        out.append(f"| ![]({name}) | {what} | " + " | ".join(cells) + " |")
    return out


def write_report(run_dir: Path, d: Path, cfg: Any, eval_scenes: Sequence[Scene], size: int, *,
                 contrastive: bool = False) -> dict:
    run_dir = Path(run_dir)
    models = _models(cfg)
    how = ("A contrastive model writes no caption: gender is its zero-shot prediction (the image embedding "
           "against 'a photo of a man / woman' prompts in each language, softmax at the model's logit scale); "
           "BLEU and ROUGE-L do not apply." if contrastive else
           "Gender is read from each caption with the bilingual lexicons; BLEU and ROUGE-L are against the caption "
           "a perfect captioner writes (the true gender, or the neutral wording where the cue is hidden), and "
           "against visible-cue scenes alone.")
    pool = ("from a caption folder" if cfg.data else
            f"balanced context x gender, {cfg.eval_hidden_rate:.0%} with the cue hidden")
    md = ["# Caption gender bias", "",
          f"Model: `{cfg.model}`; held-out scenes: {len(eval_scenes)} ({pool}); languages: {', '.join(cfg.langs)}; "
          f"seed {cfg.seed}.", how, ""]
    for s, label in models:
        m = read_json(run_dir / s / "metrics.json") if (run_dir / s / "metrics.json").exists() else {}
        if isinstance(m, dict) and m.get("skipped"):
            md += [f"- {label}: skipped ({m['skipped']})"]
    md += [""] if md[-1] != "" else []
    summary: dict[str, Any] = {}
    for lang in cfg.langs:
        rows, data = _table(run_dir, lang, models)
        summary[lang] = data
        md += [f"## Before and after ({lang})", "", *rows, ""]
    sae = read_json(run_dir / "sae" / "metrics.json") if (run_dir / "sae" / "metrics.json").exists() else None
    if sae:
        m, sp = sae["metrics"], sae["splice"]
        md += ["## Sparse autoencoder", "", f"Site `{sae['site']}`, {cfg.sae.sae.architecture}, trained on "
               f"{sae['n_train_vectors']} vectors; metrics on {sae['n_heldout_images']} held-out images. Loss: "
               f"{sp.get('metric', 'caption loss (nats per caption token)')}, with the SAE's reconstruction spliced "
               "in and with the site zero-ablated.", "",
               "| L0 | explained variance | dead latents | loss clean | loss SAE | loss zero-ablated | loss recovered |",
               "|---|---|---|---|---|---|---|",
               f"| {_num(m.get('l0'), '.2f')} | {_num(m.get('explained_variance'), '.3f')} | "
               f"{_num(m.get('dead_share'), '.1%')} | {_num(sp['loss_clean'], '.3f')} | {_num(sp['loss_sae'], '.3f')} | "
               f"{_num(sp['loss_zero_ablation'], '.3f')} | {_num(sp['loss_recovered'], '.3f')} |", ""]
        summary["sae"] = sae
    loc = read_json(run_dir / "locate" / "metrics.json") if (run_dir / "locate" / "metrics.json").exists() else None
    if loc:
        md += ["## Gender latents", "", f"{loc['n_latents_ci_excludes_half']} latents have an AUROC CI excluding 0.5 "
               f"(n = {loc['n_images']} balanced images); the top {len(loc['gender_latents'])}:", "",
               "| latent | AUROC [95% CI] | favours | mean (female) | mean (male) |", "|---|---|---|---|---|"]
        md += [f"| {r['latent']} | {r['auroc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['favours']} | "
               f"{r['mean_female']:.3f} | {r['mean_male']:.3f} |" for r in loc["gender_latents"]]
        pm = loc["patching"]
        sites = list(pm["sites"])
        what = ("change in p(female)" if pm.get("measure") == "p_female" else "caption preference")
        if not sites:
            md += ["", "## Where gender enters (activation patching)", "",
                   f"{pm.get('n_pairs', 0)} scene/twin pairs: patching needs gender-swapped twins, which only "
                   "synthetic scenes have (a photograph cannot be redrawn with the other gender)."]
        if sites:
            lines({"share carried": (list(range(len(sites))), [pm["sites"][s]["share"] for s in sites])},
                  d / "patching.png", xlabel=" | ".join(sites), ylabel=f"share of the twin's {what}", hline=1.0,
                  title="Activation patching: twin -> scene, by site")
            md += ["", "## Where gender enters the caption (activation patching)", "",
                   f"{pm['n_pairs']} scene/twin pairs ({pm['lang']}); share of the twin's {what} carried "
                   "when one site is patched from the twin into the scene"
                   + (" (language-model sites: image positions only)." if pm.get("measure") != "p_female" else "."),
                   "", "| site | share [95% CI] |", "|---|---|"]
            md += [f"| {s} | {v['share']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}] |" for s, v in pm["sites"].items()]
            md += ["", "![patching](patching.png)"]
        summary["locate"] = loc
    md += ["", "## Examples (held-out scenes; English, then Arabic)", "", *_examples(run_dir, d, eval_scenes, size, models)]
    atomic_write_text(d / "report.md", "\n".join(md) + "\n")
    atomic_write_json(d / "report.json", summary)
    return {lang: summary[lang] for lang in cfg.langs}
