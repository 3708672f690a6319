"""Zero-shot gender probing of a contrastive image-text model (CLIP), and where gender lives in it.

CLIP writes no caption, so its gender reading is measured the way CLIP classifies: each image's
embedding against the text embeddings of gendered prompt sets ("a photo of a man" / "a photo of
a woman", averaged over a few templates; Arabic "صورة رجل" / "صورة امرأة"), a softmax over the
two classes at the model's ``logit_scale``. Image features come from ``get_image_features``, so a
``Trace`` edit at ``vision.L`` or ``projector.out`` (an SAE latent edit, a patch) changes the result.

:func:`zero_shot_splice` is the SAE's downstream check for CLIP (the caption loss of captioners):
the cross-entropy of the true gender with the site's SAE reconstruction spliced in vs the site
zero-ablated. :func:`zero_shot_patching` is activation patching from a scene's gender-swapped twin,
measured as the share of the twin's change in p(female) that one patched site carries.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from excise.errors import ExciseError
from excise.measure.stats import bootstrap
from excise.tasks.caption_prompts import pixel_values
from excise.trace import Edit, Trace
from excise.trace_store import expand_vlm_sites

CLASSES = ("male", "female")
TEMPLATES = {"en": ("a photo of a {}", "a picture of a {}", "an image of a {}", "a photo of a {} in a room"),
             "ar": ("صورة {}", "صورة فوتوغرافية ل{}", "لقطة ل{}")}
WORDS = {"en": {"male": "man", "female": "woman"}, "ar": {"male": "رجل", "female": "امرأة"}}


def gender_prompts(lang: str = "en") -> dict[str, list[str]]:
    """The default prompt set per class: every template with the language's gendered noun."""
    if lang not in TEMPLATES:
        raise ExciseError(f"no zero-shot gender prompts for language '{lang}'; choose one of {', '.join(TEMPLATES)}")
    return {g: [t.format(WORDS[lang][g]) for t in TEMPLATES[lang]] for g in CLASSES}


def _emb(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    x = out.pooler_output if hasattr(out, "pooler_output") else out
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero-ablated embedding stays 0, not NaN


def text_classes(handle: Any, lang: str = "en", prompts: Mapping[str, Sequence[str]] | None = None) -> torch.Tensor:
    """[2, d] unit class embeddings (male, female): the mean of each class's unit prompt embeddings."""
    prompts = prompts or gender_prompts(lang)
    if any(not prompts.get(g) for g in CLASSES):
        raise ExciseError("zero-shot prompts need a non-empty list for both 'male' and 'female'")
    tok = handle.processor.tokenizer
    rows = []
    with torch.inference_mode():
        for g in CLASSES:
            enc = tok(list(prompts[g]), padding=True, return_tensors="pt").to(handle.device)
            e = _emb(handle.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
            rows.append(e.mean(0))
    return _emb(torch.stack(rows))


def gender_logits(handle: Any, images: Sequence[Any] | torch.Tensor, lang: str = "en",
                  prompts: Mapping[str, Sequence[str]] | None = None, *, batch_size: int = 64,
                  edits: Sequence[Edit] = (), classes: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 2] zero-shot logits (male, female) at the model's logit scale.

    ``images``: PIL images or preprocessed pixel values. ``edits`` apply to the image tower only
    (patches carry one value per image and are sliced per batch); an outer ``Trace`` works too.
    """
    if not callable(getattr(handle.model, "get_image_features", None)):
        raise ExciseError(f"{type(handle.model).__name__} has no get_image_features: zero-shot probing needs a "
                          "contrastive image-text model such as CLIP")
    px = images if isinstance(images, torch.Tensor) else pixel_values(handle.processor, list(images))
    cls = classes if classes is not None else text_classes(handle, lang, prompts)
    out = []
    for s in range(0, px.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        eds = [Edit(e.site, e.op, e.value[sl] if e.op == "patch" else e.value, e.heads, e.positions) for e in edits]
        with torch.inference_mode(), (Trace(handle, edits=eds) if eds else nullcontext()):
            img = _emb(handle.model.get_image_features(pixel_values=px[sl].to(handle.device)))
            scale = handle.model.logit_scale.exp().clamp(max=100.0)
            out.append((scale * img @ cls.T).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def zero_shot_gender(handle: Any, images: Sequence[Any] | torch.Tensor, lang: str = "en",
                     prompts: Mapping[str, Sequence[str]] | None = None, batch_size: int = 64,
                     edits: Sequence[Edit] = ()) -> tuple[list[str], np.ndarray]:
    """(predicted gender per image, p(female) per image). An exact tie (both classes' text
    embeddings alike, e.g. a tokenizer that knows no word of the prompts) predicts ``none``."""
    p = torch.softmax(gender_logits(handle, images, lang, prompts, batch_size=batch_size, edits=edits), -1)[:, 1]
    p_female = p.numpy().astype(float)
    pred = ["female" if v > 0.5 else "male" if v < 0.5 else "none" for v in p_female]
    return pred, p_female


def _known(scenes: Sequence[Any]) -> list[Any]:
    return [s for s in scenes if s.visible and s.gender in CLASSES]


def zero_shot_splice(handle: Any, scenes: Sequence[Any], langs: Sequence[str], site: str, sae: Any, *,
                     size: int = 32, batch_size: int = 64) -> dict:
    """Zero-shot gender cross-entropy (nats per image) and accuracy (a tie counts as wrong), clean, with the SAE's
    reconstruction spliced in at ``site``, and with the site zero-ablated (a zero embedding is
    chance: p = 0.5); loss recovered = (zero - sae) / (zero - clean), NaN when zero == clean."""
    scenes = _known(scenes)
    out: dict[str, Any] = {"metric": "zero-shot gender cross-entropy (nats per image), visible scenes",
                           "n_images": len(scenes), "langs": list(langs)}
    if not scenes:
        nan = float("nan")
        return {**out, "loss_clean": nan, "loss_sae": nan, "loss_zero_ablation": nan, "loss_recovered": nan}
    px = pixel_values(handle.processor, [s.image(size) for s in scenes])
    y = torch.tensor([CLASSES.index(s.gender) for s in scenes])
    runs = {"clean": [], "sae": [Edit(site, "map", lambda x: sae(x))], "zero_ablation": [Edit(site, "zero")]}
    for name, eds in runs.items():
        ce, acc = [], []
        for lang in langs:
            logits = gender_logits(handle, px, lang, batch_size=batch_size, edits=eds)
            ce.append(float(torch.nn.functional.cross_entropy(logits, y)))
            right = logits.gather(1, y[:, None])[:, 0] > logits.gather(1, 1 - y[:, None])[:, 0]  # a tie is wrong
            acc.append(float(right.float().mean()))
        out[f"loss_{name}"], out[f"accuracy_{name}"] = float(np.mean(ce)), float(np.mean(acc))
    z, c, s_ = out["loss_zero_ablation"], out["loss_clean"], out["loss_sae"]
    out["loss_recovered"] = (z - s_) / (z - c) if z != c else float("nan")
    return out


def zero_shot_patching(handle: Any, scenes: Sequence[Any], lang: str, *, size: int = 32,
                       sites: Sequence[str] | None = None, batch_size: int = 64, n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Share of the twin's change in p(female) carried by each vision site patched from the twin
    into the scene: mean(patched - clean) / mean(twin - clean) over pairs, bootstrap CI."""
    pairs = [(s, s.twin()) for s in _known(scenes)]
    pairs = [(s, t) for s, t in pairs if t is not None]
    if not pairs:
        return {"n_pairs": 0, "lang": lang, "measure": "p_female", "sites": {}}
    sites = expand_vlm_sites(handle, sites or ["vision.*", "projector.out"])
    cls = text_classes(handle, lang)
    px_s = pixel_values(handle.processor, [s.image(size) for s, _ in pairs])
    px_t = pixel_values(handle.processor, [t.image(size) for _, t in pairs])

    def p_female(px: torch.Tensor, edits: Sequence[Edit] = ()) -> np.ndarray:
        logits = gender_logits(handle, px, lang, batch_size=batch_size, edits=edits, classes=cls)
        return torch.softmax(logits, -1)[:, 1].numpy().astype(float)

    clean = p_female(px_s)
    caps: dict[str, list[torch.Tensor]] = {}
    for s in range(0, px_t.shape[0], batch_size):  # the twin's activations at every site
        with torch.inference_mode(), Trace(handle, sites, pool="all") as tr:
            handle.model.get_image_features(pixel_values=px_t[s:s + batch_size].to(handle.device))
        for k, v in tr.cache.items():
            caps.setdefault(k, []).append(v.cpu())
    swing = p_female(px_t) - clean
    result: dict[str, Any] = {"n_pairs": len(pairs), "lang": lang, "measure": "p_female",
                              "swing_mean": float(swing.mean()), "sites": {}}
    for site in sites:
        moved = p_female(px_s, [Edit(site, "patch", torch.cat(caps[site]))]) - clean
        est = bootstrap(np.stack([moved, swing], 1), lambda r: r[:, 0].mean() / r[:, 1].mean() if r[:, 1].mean() else
                        float("nan"), n_boot=n_boot, seed=seed)
        result["sites"][site] = {"share": est.value, "lo": est.lo, "hi": est.hi, "n": est.n}
    return result
