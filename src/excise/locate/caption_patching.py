"""Where gender enters a caption: activation patching between a scene and its gender-swapped twin,
and the caption loss with a sparse autoencoder's reconstruction spliced in.

Both score a captioning VLM by teacher forcing (:func:`caption_logprobs`: the summed log-probability
of a given caption for a given image), so they need no generation and no lexicon.

**Patching.** For a scene ``s`` and its twin ``t`` (the same picture with the gender cue swapped),
the *preference* of a run is ``log P(caption of t) - log P(caption of s)``. The clean run on
``s`` prefers ``s``'s caption; the run on ``t`` prefers ``t``'s. Patching one site's activations
from the twin's run into the scene's run (at the image positions for language-model sites)
moves the preference by some amount; the *share carried* at a site is that move divided by the
whole swap's, as a ratio of means over pairs with a bootstrap CI. A site that carries ~1 holds
all the gender information the caption uses (every vision block does, since the image is all
that differs); the layer where the share falls marks where the language model has already read
gender off the image tokens into the text positions.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from excise.measure.stats import bootstrap
from excise.tasks.caption_prompts import caption_batch, pixel_values, prompt_ids
from excise.tasks.captions import Scene
from excise.trace import Edit, Trace
from excise.trace_store import expand_vlm_sites


def caption_logprobs(handle: Any, images: torch.Tensor, lang_captions: Sequence[tuple[str, str]], *,
                     edits: Sequence[Edit] = (), capture: Sequence[str] = (), batch_size: int = 64
                     ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Summed log-probability of each caption (+ eos) given its image; optional edits and captures.

    ``edits`` with per-item values (patches) must cover the whole input: they are sliced per batch
    along the first axis. Returns (log-probs [N], captures concatenated over batches).
    """
    out, caps = [], {}
    for s in range(0, len(lang_captions), batch_size):
        sl = slice(s, s + batch_size)
        batch = caption_batch(handle.processor, lang_captions[sl])
        dev = handle.device
        eds = [Edit(e.site, e.op, e.value[sl] if e.op == "patch" else e.value, e.heads, e.positions) for e in edits]
        with torch.inference_mode(), Trace(handle, list(capture), eds, pool="all") as tr:
            logits = handle.model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"},
                                  pixel_values=images[sl].to(dev)).logits
        labels = batch["labels"].to(dev)[:, 1:]
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        out.append(tok.sum(-1).cpu().numpy())
        for k, v in tr.cache.items():
            caps.setdefault(k, []).append(v.cpu())
    return np.concatenate(out), {k: torch.cat(v) for k, v in caps.items()}


def _image_positions(handle: Any, lang: str) -> list[int]:
    ids = prompt_ids(handle.processor, lang)
    image_id = getattr(handle.model.config, "image_token_id", None)
    return [i for i, t in enumerate(ids) if t == image_id]


def patching_map(handle: Any, scenes: Sequence[Scene], lang: str, *, size: int = 32, sites: Sequence[str] | None = None,
                 batch_size: int = 64, n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of the twin's caption preference carried by each site when patched into the scene."""
    scenes = [s for s in scenes if s.visible]
    if not scenes:
        return {"n_pairs": 0, "sites": {}}
    twins = [s.twin() for s in scenes]
    sites = expand_vlm_sites(handle, sites or ["vision.*", "projector.out", "resid.*"])
    px_s = pixel_values(handle.processor, [s.image(size) for s in scenes])
    px_t = pixel_values(handle.processor, [t.image(size) for t in twins])
    cap_s = [(lang, s.caption(lang)) for s in scenes]
    cap_t = [(lang, t.caption(lang)) for t in twins]
    image_pos = _image_positions(handle, lang)

    def pref(px: torch.Tensor, edits_s=(), edits_t=(), capture=()):
        a, ca = caption_logprobs(handle, px, cap_t, edits=edits_t, capture=capture, batch_size=batch_size)
        b, cb = caption_logprobs(handle, px, cap_s, edits=edits_s, capture=capture, batch_size=batch_size)
        return a - b, ca, cb

    clean, _, _ = pref(px_s)
    full, twin_on_t, twin_on_s = pref(px_t, capture=sites)  # the twin's activations on both captions
    swing = full - clean
    result: dict[str, Any] = {"n_pairs": len(scenes), "lang": lang,
                              "swing_mean": float(swing.mean()), "sites": {}}
    for site in sites:
        positions = None if site.startswith(("vision.", "projector.")) else image_pos
        patched, _, _ = pref(px_s, [Edit(site, "patch", twin_on_s[site], positions=positions)],
                             [Edit(site, "patch", twin_on_t[site], positions=positions)])
        moved = patched - clean
        est = bootstrap(np.stack([moved, swing], 1), lambda r: r[:, 0].mean() / r[:, 1].mean() if r[:, 1].mean() else
                        float("nan"), n_boot=n_boot, seed=seed)
        result["sites"][site] = {"share": est.value, "lo": est.lo, "hi": est.hi, "n": est.n}
    return result


def splice_losses(handle: Any, scenes: Sequence[Scene], langs: Sequence[str], site: str, sae: Any, *,
                  size: int = 32, batch_size: int = 64) -> dict:
    """Caption loss (nats per caption token) clean, with the SAE's reconstruction spliced in at
    ``site``, and with the site zero-ablated; loss recovered = (zero - sae) / (zero - clean)."""
    px = pixel_values(handle.processor, [s.image(size) for s in scenes])
    caps = [(lang, s.caption(lang)) for lang in langs for s in scenes]
    px = px.repeat(len(langs), 1, 1, 1)
    n_tok = sum(len(handle.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in caps)

    def loss(edits: Sequence[Edit]) -> float:
        lp, _ = caption_logprobs(handle, px, caps, edits=edits, batch_size=batch_size)
        return float(-lp.sum() / n_tok)

    clean = loss([])
    spliced = loss([Edit(site, "map", lambda x: sae(x))])
    zero = loss([Edit(site, "zero")])
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {"n_captions": len(caps), "n_tokens": n_tok, "loss_clean": clean, "loss_sae": spliced,
            "loss_zero_ablation": zero, "loss_recovered": recovered}
