"""Sparse autoencoders: SAELens-compatible files and per-latent AUROC against a binary label.

Why: an SAE is only useful to the caption gender-bias workflow if (1) its latents can be ranked by
how well they separate two groups (female vs male captions) with honest uncertainty, and (2) it
can be opened by the field's tools (SAELens, Neuronpedia-style viewers), so the files follow
SAELens 6's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

Training, the model and its metrics live in :mod:`excise.locate.sae_train` (re-exported here).
Not registered in ``LOCALIZERS``: the localizer contract scores head / neuron / param units of a
model from forget/retain text, while an SAE scores dictionary features of one site from labelled
activations; forcing it in would need a new unit kind in the shared battery.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from excise.errors import ExciseError
from excise.io import atomic_dir, atomic_write_bytes, atomic_write_json, read_json
from excise.locate.sae_train import SAEConfig, SparseAutoencoder, sae_metrics, train_sae
from excise.measure.stats import Estimate

__all__ = ["SAEConfig", "SparseAutoencoder", "train_sae", "sae_metrics", "save_sae", "load_sae",
           "latent_auroc", "top_gender_latents", "SAELENS_FORMAT_VERSION"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens reads configs whose metadata.sae_lens_version is >= 6.0.0 as the 6.x format as is
# (older ones go through its pre-6 renaming); we write that format, so we claim its first version.
SAELENS_FORMAT_VERSION = "6.0.0"
_TO_SAELENS = {"l1": "standard", "topk": "topk"}
_FROM_SAELENS = {"standard": "l1", "topk": "topk"}
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_sae(sae: SparseAutoencoder, path: str | Path, hook_name: str, *, model_name: str | None = None,
             hook_head_index: int | None = None, context_size: int | None = None, prepend_bos: bool = True,
             dataset_path: str | None = None, config: SAEConfig | None = None,
             extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/`` as a SAELens 6 folder (``SAE.load_from_disk(path)`` opens it), atomically.

    ``hook_name`` names the site the SAE reads (an excise site such as ``resid.3``, or a
    TransformerLens hook name); ``config`` and ``extra`` are kept under ``metadata.excise``.
    """
    if not hook_name:
        raise ExciseError("save_sae needs the hook_name (site) the SAE was trained on")
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_name": hook_name,
                            "hook_head_index": hook_head_index, "prepend_bos": prepend_bos}
    if model_name is not None:
        meta["model_name"] = model_name
    if context_size is not None:
        meta["context_size"] = context_size
    if dataset_path is not None:
        meta["dataset_path"] = dataset_path
    meta["excise"] = {"architecture": sae.architecture, "act_scale": sae.act_scale,
                      "config": config.model_dump() if config is not None else None, **(extra or {})}
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    cfg: dict[str, Any] = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype, "device": "cpu",
                           "apply_b_dec_to_input": True, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": meta,
                           "architecture": _TO_SAELENS[sae.architecture]}
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    tensors = {k: getattr(sae, k).detach().cpu().contiguous() for k in _WEIGHTS}
    path = Path(path)
    with atomic_dir(path) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / CFG_FILE, cfg)
    return path


def load_sae(path: str | Path, device: Any = None, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Read a folder written by :func:`save_sae` or by SAELens (``standard`` and ``topk`` architectures)."""
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ExciseError(f"not an SAE folder: needs {CFG_FILE} and {WEIGHTS_FILE}", where=str(path))
    cfg = read_json(path / CFG_FILE)
    arch = cfg.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise ExciseError(f"SAE architecture '{arch}' is not supported; excise reads standard and topk",
                          where=f"{path / CFG_FILE}:architecture")
    if cfg.get("normalize_activations", "none") != "none":
        raise ExciseError("activation normalisation is not folded into these weights; fold it in SAELens first",
                          where=f"{path / CFG_FILE}:normalize_activations")
    if not cfg.get("apply_b_dec_to_input", True):
        raise ExciseError("apply_b_dec_to_input=false is not supported", where=f"{path / CFG_FILE}:apply_b_dec_to_input")
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        missing = [k for k in _WEIGHTS if k not in f.keys()]
        if missing:
            raise ExciseError(f"missing tensors {', '.join(missing)}", where=str(path / WEIGHTS_FILE))
        w = {k: f.get_tensor(k) for k in _WEIGHTS}
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):  # fold the norms as SAELens does
        norms = w["W_dec"].norm(dim=1).clamp_min(1e-8)
        w["W_dec"], w["W_enc"], w["b_enc"] = w["W_dec"] / norms[:, None], w["W_enc"] * norms, w["b_enc"] * norms
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if tuple(w["W_enc"].shape) != (d_in, d_sae) or tuple(w["W_dec"].shape) != (d_sae, d_in):
        raise ExciseError(f"weight shapes do not match d_in={d_in}, d_sae={d_sae}", where=str(path / WEIGHTS_FILE))
    dtype = dtype or w["W_enc"].dtype
    sae = SparseAutoencoder(d_in, d_sae, _FROM_SAELENS[arch], cfg.get("k"), dtype=dtype, device=device)
    with torch.no_grad():
        for k in _WEIGHTS:
            getattr(sae, k).copy_(w[k])
    sae.act_scale = float(((cfg.get("metadata") or {}).get("excise") or {}).get("act_scale", 1.0))
    sae.requires_grad_(False)
    return sae


def _midcount_index(col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of one latent's values and, per sorted position, where its tie group starts and ends."""
    order = np.argsort(col, kind="stable")
    s = col[order]
    new = np.r_[True, s[1:] != s[:-1]]
    gid = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(s)]
    return order, starts[gid], ends[gid]


def _weighted_auc(order: np.ndarray, start: np.ndarray, end: np.ndarray, w: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of one latent under item weights w [B, N] (bootstrap counts): Mann-Whitney with midranks.

    U = sum_pos w_i (W(s < s_i) + W(s = s_i) / 2) - W1^2 / 2; the positive-positive pairs cancel to
    W1^2 / 2 because each unordered pair contributes exactly 1, so only one sort per latent is needed.
    """
    ws = w[:, order]
    c = np.zeros((w.shape[0], w.shape[1] + 1))
    np.cumsum(ws, axis=1, out=c[:, 1:])
    below, tied = c[:, start], c[:, end] - c[:, start]
    mid = below + 0.5 * tied
    ps = pos[order]
    w1 = (ws * ps).sum(1)
    w0 = ws.sum(1) - w1
    u = (ws * ps * mid).sum(1) - 0.5 * w1 * w1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((w1 > 0) & (w0 > 0), u / (w1 * w0), np.nan)


def latent_auroc(latents: Any, labels: Sequence[int] | Any, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, chunk: int = 250) -> list[Estimate]:
    """Per-latent AUROC of latents [N, K] for binary labels [N] (1 = positive), with bootstrap CIs.

    Resamples items exactly as :func:`excise.measure.stats.bootstrap` does (same seed, same
    indices; resamples with one class missing are dropped), but as weight matrices so each latent
    is sorted once instead of calling sklearn n_boot times. AUROC 0.5 = no separation; values
    below 0.5 mean the latent fires more on label 0. A class absent from the data -> NaN, n = 0.
    """
    z = torch.as_tensor(latents).detach().cpu().double().numpy() if not isinstance(latents, np.ndarray) \
        else np.asarray(latents, dtype=float)
    y = np.asarray(torch.as_tensor(labels).cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if z.ndim != 2:
        raise ExciseError(f"latent_auroc needs latents [N, K], got shape {z.shape}")
    if y.ndim != 1 or len(y) != len(z):
        raise ExciseError(f"latent_auroc needs one label per row: {len(z)} rows, labels of shape {y.shape}")
    if len(y) and not np.isin(y, (0, 1)).all():
        raise ExciseError("latent_auroc labels must be 0 or 1")
    if not np.isfinite(z).all():
        raise ExciseError("latent_auroc: latents contain NaN or inf")
    n, k = z.shape
    pos = (y == 1).astype(float)
    if n == 0 or pos.sum() == 0 or pos.sum() == n:
        return [Estimate.undefined("auroc-bootstrap") for _ in range(k)]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # the draw stats.bootstrap makes for this seed
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(float)
    w1_all = counts @ pos  # positive weight per resample, shared by every latent
    w0_all = n - w1_all
    out: list[Estimate] = []
    for j in range(k):
        # SAE latents are mostly 0: the largest tie group enters as two pseudo-items (its positive and
        # negative weight = totals minus the rest), so the work per latent scales with its non-mode items
        col = z[:, j]
        vals, freq = np.unique(col, return_counts=True)
        mode = vals[np.argmax(freq)]
        rest = np.flatnonzero(col != mode)
        v = np.r_[col[rest], mode, mode]
        p = np.r_[pos[rest], 1.0, 0.0]
        order, start, end = _midcount_index(v)
        cr = np.ones((1, len(rest)))
        pt = np.c_[cr, pos.sum() - cr @ pos[rest], (n - pos.sum()) - cr @ (1 - pos[rest])]
        point = float(_weighted_auc(order, start, end, pt, p)[0])
        chunks = []
        for b in range(0, n_boot, chunk):
            cr = counts[b:b + chunk][:, rest]
            wb = np.c_[cr, w1_all[b:b + chunk] - cr @ pos[rest], w0_all[b:b + chunk] - cr @ (1 - pos[rest])]
            chunks.append(_weighted_auc(order, start, end, wb, p))
        boots = np.concatenate(chunks) if chunks else np.array([])
        boots = boots[~np.isnan(boots)]
        if boots.size == 0:
            out.append(Estimate(point, math.nan, math.nan, n, "auroc-bootstrap"))
            continue
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        out.append(Estimate(point, float(lo), float(hi), n, "auroc-bootstrap"))
    return out


def top_gender_latents(latents: Any, labels: Sequence[int] | Any, top: int | None = None, n_boot: int = 1000,
                       seed: int = 0) -> list[tuple[int, Estimate]]:
    """Latents whose AUROC CI excludes 0.5, ranked by |AUROC - 0.5| (strongest first): [(index, Estimate)].

    Works for any binary attribute; for captions, labels are 1 for female and 0 for male subjects,
    so AUROC > 0.5 marks a "female" latent and < 0.5 a "male" one.
    """
    est = latent_auroc(latents, labels, n_boot=n_boot, seed=seed)
    keep = [(j, e) for j, e in enumerate(est) if e.excludes(0.5)]
    keep.sort(key=lambda t: (-abs(t[1].value - 0.5), t[0]))
    return keep[:top] if top is not None else keep
