"""Head attribution for BBQ: which attention heads carry the model's preference for the biased answer.

Three views per head, all on pairs of BBQ items that share a template (same category, question,
polarity and answers; the disambiguated context extends the ambiguous one):

* **correlation** -- Pearson r, over pairs, between the change of the head's activity and the
  change of the model's *biased-answer log-odds* (log p(biased) - log(1 - p(biased)), p over the
  three options' log-likelihoods) from the ambiguous to the disambiguated version. A head whose
  activity tracks the context sensitivity is part of the circuit that decides "stereotype or
  context". Activity is ``attribution`` (the head's first-order contribution to the item's
  log-odds, gradient x activation summed over positions) or ``norm`` (L2 norm of its ``attn.L.z``
  slice at the last prompt token).
* **estimate** -- attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate
  of how much zero-ablating the head lowers the ambiguous items' biased log-odds, for every head
  from one forward and backward pass.
* **ablation** -- the causal check: the head really ablated (scale 0, ``excise.intervene.heads``)
  and the drop of the mean biased log-odds on ambiguous items measured, with a 95% CI, for the
  candidates the cheap views rank highest. With ``split`` (the default) the cheap views and the
  choice of candidates use one half of the pairs (``selection``) and the ablation is measured on
  the other (``measurement``): a CI computed on the pairs that chose a head would be biased upward.

The ranking score is the measured ablation effect (heads not measured are NaN, never selected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from excise.errors import ExciseError
from excise.io import atomic_write_csv
from excise.lm import choice_logprobs
from excise.locate.base import LOCALIZERS, LocateData
from excise.measure.stats import mean_ci
from excise.report.plots import heatmap
from excise.tasks.bbq_prompts import loglik_options, loglik_prompt
from excise.trace import Edit, Trace
from excise.units import Scores
from excise.registry import Configured
from excise.train import requires_grad


MIN_PAIRS = 3  # pairs needed to correlate (and, when split, to measure) at all


class HeadAttributionConfig(BaseModel):
    """Settings of the BBQ head localizer."""

    model_config = {"extra": "forbid"}
    activity: Literal["attribution", "norm"] = Field(
        "attribution", description="head activity correlated with context sensitivity: gradient x activation, or ||z||")
    n_candidates: int = Field(6, ge=0, description="heads ablated for the causal check, from each of the estimate "
                                                   "and correlation rankings (union); 0 ablates every head")
    batch_size: int = Field(8, ge=1, description="items per forward pass")
    score: Literal["ablation", "estimate", "correlation"] = Field(
        "ablation", description="which view ranks heads (ablation: measured effect; others: the cheap views)")
    split: bool = Field(True, description="choose candidates on half of the pairs and measure their ablation on the "
                                          "other half, so the measured effects carry no selection bias")


# --- pairs and targets ---------------------------------------------------------------------------

def pair_items(items: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(ambiguous, disambiguated) pairs of the same template: same category, question index,
    polarity and answers, the disambiguated context starting with the ambiguous one."""
    dis: dict[tuple, list[Any]] = {}
    for it in items:
        if it.context_condition == "disambig" and it.target_loc is not None:
            dis.setdefault(_pair_key(it), []).append(it)
    pairs, used = [], set()
    for it in items:
        if it.context_condition != "ambig" or it.target_loc is None:
            continue
        for d in dis.get(_pair_key(it), []):
            if id(d) not in used and d.context.startswith(it.context.strip()[:40]):
                pairs.append((it, d))
                used.add(id(d))
                break
    return pairs


def _pair_key(it: Any) -> tuple:
    return (it.category, it.question_index, it.question_polarity, tuple(it.answers))


def biased_logodds(lp: torch.Tensor, biased: torch.Tensor) -> torch.Tensor:
    """log p(biased) - log(1 - p(biased)) with p = softmax over the options' log-likelihoods."""
    lp = lp.float()
    b = lp.gather(1, biased.view(-1, 1)).squeeze(1)
    others = lp.masked_fill(torch.nn.functional.one_hot(biased, lp.shape[1]).bool(), float("-inf"))
    return b - torch.logsumexp(others, 1)


# --- one pass: log-odds, activity, attribution ------------------------------------------------------

def _pass(handle: Any, items: Sequence[Any], activity: str, kind: str = "head") -> dict[str, np.ndarray]:
    """Biased log-odds [N], unit activity [N, L, H] and grad.x (first-order drop when ablated) [N, L, H].

    ``kind="head"``: units are heads (``attn.L.z`` per head); ``"mlp"``: each layer's MLP output
    (``mlp.L.out``, H = 1)."""
    an = handle.anatomy
    L = an.n_layers
    H, D = (an.n_heads, an.head_dim) if kind == "head" else (1, an.d_model)
    model = handle.model
    # gradients must reach the unit sites only: freeze the weights, make the embeddings' output require grad
    sites = [f"attn.{l}.z" if kind == "head" else f"mlp.{l}.out" for l in range(L)]
    with requires_grad(model, False):
        with torch.enable_grad(), Trace(handle, sites, detach=False, keep_passes=True, grad_from_embeddings=True) as zg:
            lp = choice_logprobs(handle, [loglik_prompt(x) for x in items], [loglik_options(x) for x in items],
                                 model=model)
            biased = torch.tensor([x.target_loc for x in items], device=lp.device)
            lo = biased_logodds(lp, biased)
            for call in zg.passes:  # gradients of attn.L.z itself: the first-order effect of ablating a head
                for z in call.values():
                    if z.requires_grad:
                        z.retain_grad()
            lo.sum().backward()
            n = len(items)
            contrib = torch.zeros(n, L, H)
            norm = torch.zeros(n, L, H)
            k = 3
            for ci, call in enumerate(zg.passes):
                for l, site in enumerate(sites):
                    z = call[site]
                    g = z.grad if z.grad is not None else torch.zeros_like(z)
                    gz = (g * z).detach().view(z.shape[0], z.shape[1], H, D).sum(-1).sum(1)  # [B, H]
                    if ci == 0:
                        contrib[:, l] += gz.cpu()
                        norm[:, l] = z.detach()[:, -1].view(n, H, D).norm(dim=-1).cpu()  # last prompt token
                    else:  # the option pass: k rows per item
                        contrib[:, l] += gz.view(n, k, H).sum(1).cpu()
    act = contrib if activity == "attribution" else norm
    return {"logodds": lo.detach().cpu().numpy().astype(float), "activity": act.numpy().astype(float),
            "estimate": contrib.numpy().astype(float)}


def mean_logodds(handle: Any, items: Sequence[Any], batch_size: int = 8) -> np.ndarray:
    """Biased log-odds per item [N] under whatever hooks are attached (no gradients)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            chunk = list(items[s:s + batch_size])
            lp = choice_logprobs(handle, [loglik_prompt(x) for x in chunk], [loglik_options(x) for x in chunk])
            out.append(biased_logodds(lp.cpu(), torch.tensor([x.target_loc for x in chunk])))
    return torch.cat(out).numpy().astype(float)


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Pearson r of x [N, U] with y [N] and two-sided p-values; NaN where undefined."""
    from scipy import stats

    n = len(y)
    xc = x - x.mean(0)
    yc = y - y.mean()
    den = np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (xc * yc[:, None]).sum(0) / den, np.nan)
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt(max(n - 2, 0) / np.maximum(1e-300, 1 - r ** 2))
    p = 2 * stats.t.sf(np.abs(t), max(n - 2, 1)) if n > 2 else np.full_like(r, np.nan)
    return r, np.where(np.isnan(r), np.nan, p)


@dataclass
class HeadAttribution:
    """The localizer's output: Scores (kind="head") plus every per-head view for the report."""

    scores: Scores
    correlation: np.ndarray  # [L, H]
    p_value: np.ndarray
    estimate: np.ndarray  # [L, H] attribution-patching estimate of the ablation effect
    ablation: np.ndarray  # [L, H] measured drop of biased log-odds (NaN: not measured)
    ablation_lo: np.ndarray
    ablation_hi: np.ndarray
    n_pairs: int
    base_logodds: float
    meta: dict = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The ranked head table (CSV): rank by score, then every view with its CI / p-value."""
        L, H = self.correlation.shape
        vals = self.scores.values.numpy()
        order = sorted(((l, h) for l in range(L) for h in range(H)),
                       key=lambda lh: (-(vals[lh] if np.isfinite(vals[lh]) else -np.inf), -self.estimate[lh]))
        out = []
        for rank, (l, h) in enumerate(order, start=1):
            out.append({"rank": rank, "layer": l, "head": h, "score": float(vals[l, h]),
                        "ablation_effect": float(self.ablation[l, h]), "ablation_lo": float(self.ablation_lo[l, h]),
                        "ablation_hi": float(self.ablation_hi[l, h]), "estimate": float(self.estimate[l, h]),
                        "correlation": float(self.correlation[l, h]), "p_value": float(self.p_value[l, h]),
                        "n_pairs": self.n_pairs})
        return out

    def precision_at_k(self, truth: Sequence[tuple[int, int]], k: int | None = None) -> float:
        """Fraction of the top-k heads (k = number of true heads by default) that are true heads."""
        truth = {tuple(t) for t in truth}
        k = k or len(truth)
        top = [lh for lh, _ in self.scores.ranked(k)] if k else []
        return sum(1 for t in top if t in truth) / k if k else math.nan


def attribute_heads(handle: Any, items: Sequence[Any], cfg: HeadAttributionConfig | None = None, *,
                    progress: bool = False) -> HeadAttribution:
    """Score every head of a decoder on BBQ pairs built from ``items`` (see module docstring)."""
    cfg = cfg or HeadAttributionConfig()
    an = handle.anatomy
    if an is None or not an.spec.is_decoder:
        raise ExciseError("head attribution on BBQ needs a decoder language model")
    pairs = pair_items(items)
    need = MIN_PAIRS * (2 if cfg.split else 1)
    if len(pairs) < need:
        raise ExciseError(f"head attribution needs >= {need} ambiguous/disambiguated pairs of one template "
                          f"({MIN_PAIRS} per half when split), got {len(pairs)}")
    L, H = an.n_layers, an.n_heads
    if cfg.split:  # pairs come polarity-alternated: positions 0,3 | 1,2 of every four keep both halves mixed
        measure = [p for i, p in enumerate(pairs) if i % 4 in (1, 2)]
        pairs = [p for i, p in enumerate(pairs) if i % 4 in (0, 3)]
    else:
        measure = pairs
    flat = [x for p in pairs for x in p]  # a0, d0, a1, d1, ...
    parts = []
    it = range(0, len(flat), cfg.batch_size)
    if progress:
        it = tqdm(it, desc="attribution", unit="batch")
    for s in it:
        parts.append(_pass(handle, flat[s:s + cfg.batch_size], cfg.activity))
    lo = np.concatenate([p["logodds"] for p in parts])
    act = np.concatenate([p["activity"] for p in parts]).reshape(len(flat), L * H)
    est_items = np.concatenate([p["estimate"] for p in parts])
    amb, dis = np.arange(0, len(flat), 2), np.arange(1, len(flat), 2)
    sensitivity = lo[amb] - lo[dis]
    r, pval = _pearson(act[amb] - act[dis], sensitivity)
    r, pval = r.reshape(L, H), pval.reshape(L, H)
    estimate = est_items[amb].mean(0)  # [L, H], on ambiguous items
    # causal check: really ablate the candidates, on the measurement pairs
    amb_items = [p[0] for p in measure]
    base = lo[amb] if not cfg.split else mean_logodds(handle, amb_items, cfg.batch_size)
    if cfg.n_candidates == 0:
        cands = [(l, h) for l in range(L) for h in range(H)]
    else:
        by_est = np.argsort(-estimate.flatten(), kind="stable")[: cfg.n_candidates]
        by_r = np.argsort(-np.nan_to_num(r.flatten(), nan=-np.inf), kind="stable")[: cfg.n_candidates]
        cands = sorted({(int(i) // H, int(i) % H) for i in list(by_est) + list(by_r)})
    abl = np.full((L, H), np.nan)
    abl_lo, abl_hi = abl.copy(), abl.copy()
    citer = cands
    if progress:
        citer = tqdm(cands, desc="ablation check", unit="head")
    for (l, h) in citer:
        with Trace(handle, edits=[Edit(f"attn.{l}.z", "zero", heads=[h])]):
            ablated = mean_logodds(handle, amb_items, cfg.batch_size)
        e = mean_ci(base - ablated)
        abl[l, h], abl_lo[l, h], abl_hi[l, h] = e.value, e.lo, e.hi
    view = {"ablation": abl, "estimate": estimate, "correlation": r}[cfg.score]
    scores = Scores(kind="head", values=torch.tensor(view, dtype=torch.float32), method=f"bbq-heads/{cfg.score}",
                    meta={"n_pairs": len(pairs), "n_measure_pairs": len(measure), "candidates": cands})
    return HeadAttribution(scores=scores, correlation=r, p_value=pval, estimate=estimate, ablation=abl,
                           ablation_lo=abl_lo, ablation_hi=abl_hi, n_pairs=len(pairs),
                           base_logodds=float(base.mean()),
                           meta={"activity": cfg.activity, "score": cfg.score, "n_candidates": len(cands),
                                 "n_measure_pairs": len(measure), "split": cfg.split,
                                 "context_sensitivity_mean": float(sensitivity.mean())})


def save_attribution(att: HeadAttribution, directory: Any, *, title: str = "") -> list[str]:
    """Write heads.csv (ranked table), head_scores.safetensors and layer x head heatmaps."""
    d = Path(directory)
    atomic_write_csv(d / "heads.csv", att.rows())
    att.scores.save(str(d / "head_scores.safetensors"))
    files = ["heads.csv", "head_scores.safetensors"]
    for name, m, label in (("heads_ablation.png", att.ablation, "drop of biased log-odds when ablated"),
                           ("heads_estimate.png", att.estimate, "estimated drop (attribution patching)"),
                           ("heads_correlation.png", att.correlation, "Pearson r with context sensitivity")):
        heatmap(m, d / name, title=f"{title} {label}".strip(), xlabel="head", ylabel="layer", cmap="RdBu_r",
                center=0.0, colorbar_label=label)
        files.append(name)
    return files


@LOCALIZERS.register
class HeadLocalizer(Configured):
    """BBQ head attribution: heads whose ablation lowers the biased-answer log-odds (measured on candidates)."""

    name = "heads"
    Config = HeadAttributionConfig
    needs = ("items",)

    def score(self, handle: Any, data: LocateData) -> Scores:
        data.require(self.needs, self.name)
        return attribute_heads(handle, list(data.items), self.config).scores
