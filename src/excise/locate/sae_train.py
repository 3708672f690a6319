"""Sparse autoencoders (SAEs) on activations: the model, its training loop and its quality metrics.

Why: a site's activations mix many concepts in each coordinate; an SAE rewrites each activation
as a sparse non-negative combination of learned directions (latents), so "the latent that fires
on female captions" becomes something one can find, score and act on. Two architectures:

* ``l1``   ReLU encoder, L1 penalty on the latents (Bricken et al., 2023; SAELens "standard").
* ``topk`` keep the k largest pre-activations (Gao et al., 2024; SAELens "topk"): L0 is exactly k
  by construction, so no sparsity coefficient needs tuning, and dead latents are revived by the
  AuxK loss (the top ``d_in // 2`` dead latents reconstruct the residual the live ones leave).

Layout matches SAELens 6: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]``; ``encode(x) = act((x - b_dec) @ W_enc + b_enc)``, ``decode(z) = z @ W_dec + b_dec``.
Training runs on activations scaled to mean norm ``sqrt(d_in)`` (SAELens'
``expected_average_only_in``: about unit mean square per coordinate), so one ``l1_coeff`` and one
``lr`` work at any activation scale; the factor is folded into the weights afterwards, so the
returned SAE reads and writes the caller's activation space.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from excise.config import validate
from excise.errors import ExciseError

NAN = float("nan")
# Encoder starts at 0.1 x the decoder transpose (in the spirit of Anthropic's April 2024 0.1
# heuristic, which SAELens uses): latents start small, so the L1 penalty does not first have to
# grind down a dense start; on the benchmark this reached a given L0 in fewer epochs than 1.0.
_ENC_INIT = 0.1


class SAEConfig(BaseModel):
    """SAE training settings; defaults suit small activation sets (d_in ~ 64, N ~ 4-8k)."""

    model_config = {"extra": "forbid"}
    architecture: Literal["l1", "topk"] = Field(
        "topk", description="'topk' (exact L0 = k, AuxK revives dead latents) or 'l1' (ReLU + L1 penalty, the seed's SAE)")
    expansion: int = Field(4, ge=1, description="dictionary size as a multiple of d_in (ignored when d_sae is set)")
    d_sae: int | None = Field(None, ge=1, description="dictionary size; None means expansion * d_in")
    l1_coeff: float = Field(
        1.0, ge=0, description="l1 only: weight of sum_j |z_j| ||W_dec_j|| against the summed squared error, "
        "both on normalised activations (same meaning as SAELens' l1_coefficient)")
    k: int = Field(8, ge=1, description="topk only: latents kept per input (the L0)")
    auxk_coeff: float = Field(1 / 32, ge=0, description="topk only: weight of the AuxK dead-latent loss (Gao et al., 2024)")
    dead_after: int = Field(
        4096, ge=1, description="during training a latent counts as dead once it has not fired on this many inputs "
        "(drives AuxK and the history); sae_metrics calls a latent dead if it never fires on the evaluated set")
    epochs: int = Field(40, ge=1, description="passes over the activations")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate (higher than SAELens' 3e-4: small sets give few steps)")
    lr_decay: float = Field(0.2, ge=0, le=1, description="fraction of the final steps over which the lr decays linearly to 0")
    batch_size: int = Field(256, ge=1, description="inputs per Adam step")
    normalize: bool = Field(True, description="train on activations scaled to mean norm sqrt(d_in), then fold the factor into the weights")
    unit_decoder: bool = Field(
        True, description="keep every decoder row at unit norm, so the L1 penalty cannot be dodged by shrinking latents "
        "while growing the decoder, and latent sizes are comparable across latents (and TopK compares like with like)")
    seed: int = Field(0, description="seed of the initial weights and of the batch order")

    @model_validator(mode="after")
    def _check(self) -> "SAEConfig":
        if self.architecture == "topk" and self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}")
        return self

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in


class SparseAutoencoder(nn.Module):
    """An SAE in the caller's activation space, with SAELens' parameter names and shapes.

    ``encode`` / ``decode`` / ``forward`` take inputs on any device or dtype and compute on the
    SAE's own; ``forward`` returns the reconstruction in the input's dtype and device.
    """

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        if architecture not in ("l1", "topk"):
            raise ExciseError(f"unknown SAE architecture '{architecture}'; choose l1 or topk")
        if architecture == "topk" and (k is None or not 1 <= k <= d_sae):
            raise ExciseError(f"a topk SAE needs 1 <= k <= d_sae={d_sae}, got k={k}")
        self.d_in, self.d_sae, self.architecture = int(d_in), int(d_sae), architecture
        self.k = int(k) if architecture == "topk" else None
        self.act_scale = 1.0  # the training normalisation factor, already folded into the weights
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.shape[-1] != self.d_in:
            raise ExciseError(f"SAE expects activations with last dimension {self.d_in}, got shape {tuple(x.shape)}")
        return x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (self._in(x) - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "l1":
            return torch.relu(pre)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())  # topk then ReLU, as SAELens

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] (non-negative; at most k non-zero for topk)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(device=self.W_dec.device, dtype=self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        return self.decode(self.encode(x)).to(device=x.device, dtype=x.dtype if x.is_floating_point() else self.W_dec.dtype)


def _check_acts(acts: Any, who: str) -> torch.Tensor:
    x = torch.as_tensor(acts)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ExciseError(f"{who} needs activations of shape [N, d_in] with N, d_in > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ExciseError(f"{who}: activations contain NaN or inf")
    return x


def _init(sae: SparseAutoencoder, x: torch.Tensor, g: torch.Generator) -> None:
    """Unit-norm random decoder rows, encoder = 0.1 x decoder transpose (tied init), b_dec = data mean."""
    with torch.no_grad():
        w = torch.randn(sae.d_sae, sae.d_in, generator=g, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T * _ENC_INIT)
        sae.b_enc.zero_()
        sae.b_dec.copy_(x.mean(0))


def _auxk(sae: SparseAutoencoder, pre: torch.Tensor, resid: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK (Gao et al., 2024, App. B.1): the top d_in // 2 dead latents reconstruct the live residual."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(max(sae.d_in // 2, 1), n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    err = (z @ sae.W_dec - resid).pow(2).sum(-1).mean()
    return err * min(n_dead / max(sae.d_in // 2, 1), 1.0)


def train_sae(acts: Any, cfg: SAEConfig | dict | None = None, progress: bool = False,
              device: Any = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train an SAE on activations [N, d_in] with Adam; returns (sae, history).

    Whole-batch tensor ops only. Deterministic on CPU for a seed. Dead latents: ``topk`` revives
    them with AuxK; ``l1`` only reports them (history["dead"], ``sae_metrics``) — no resampling.
    ``history`` holds per-epoch lists (loss, mse, l0, dead) and run facts (act_scale, steps, wall_s).
    """
    cfg = validate(SAEConfig, cfg, "SAEConfig") if isinstance(cfg, dict) else (cfg or SAEConfig())
    x = _check_acts(acts, "train_sae")
    dev = torch.device(device) if device is not None else x.device
    x = x.to(device=dev, dtype=torch.float32)
    n, d_in = x.shape
    d_sae = cfg.width(d_in)
    if cfg.architecture == "topk" and cfg.k > d_sae:
        raise ExciseError(f"SAE k={cfg.k} exceeds the dictionary size d_sae={d_sae}")
    t0 = time.perf_counter()
    scale = 1.0
    if cfg.normalize:
        mean_norm = float(x.norm(dim=1).mean())
        if mean_norm == 0.0:
            raise ExciseError("train_sae: all activations are zero; nothing to learn")
        scale = math.sqrt(d_in) / mean_norm
    xs = x * scale
    g = torch.Generator().manual_seed(cfg.seed)
    sae = SparseAutoencoder(d_in, d_sae, cfg.architecture, cfg.k, device=dev)
    _init(sae, xs.cpu(), g)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay_from = total - int(round(cfg.lr_decay * total))
    since_fired = torch.zeros(d_sae, device=dev)
    hist: dict[str, Any] = {"epoch": [], "loss": [], "mse": [], "l0": [], "dead": []}
    step = 0
    bar = tqdm(range(cfg.epochs), desc=f"SAE {cfg.architecture}", disable=not progress)
    for epoch in bar:
        perm = torch.randperm(n, generator=g).to(dev)
        tot_loss = tot_mse = tot_l0 = 0.0
        for s in range(0, n, cfg.batch_size):
            xb = xs[perm[s:s + cfg.batch_size]]
            if step >= decay_from and total > decay_from:
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * (total - step) / (total - decay_from)
            pre = (xb - sae.b_dec) @ sae.W_enc + sae.b_enc
            z = sae.activate(pre)
            x_hat = z @ sae.W_dec + sae.b_dec
            mse = (x_hat - xb).pow(2).sum(-1).mean()
            fired = (z > 0).any(0)
            since_fired += len(xb)
            since_fired[fired] = 0
            if cfg.architecture == "l1":
                sparsity = z * sae.W_dec.norm(dim=1) if not cfg.unit_decoder else z
                loss = mse + cfg.l1_coeff * sparsity.sum(-1).mean()
            else:
                dead = since_fired >= cfg.dead_after
                loss = mse + cfg.auxk_coeff * _auxk(sae, pre, (xb - x_hat).detach(), dead)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.unit_decoder:  # move along the unit sphere: drop the gradient's radial part
                with torch.no_grad():
                    w, gw = sae.W_dec, sae.W_dec.grad
                    gw -= (gw * w).sum(1, keepdim=True) * w
            opt.step()
            if cfg.unit_decoder:
                with torch.no_grad():
                    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            step += 1
            b = len(xb)
            tot_loss += float(loss.detach()) * b
            tot_mse += float(mse.detach()) * b
            tot_l0 += float((z > 0).sum()) / 1.0
        hist["epoch"].append(epoch)
        hist["loss"].append(tot_loss / n)
        hist["mse"].append(tot_mse / n)
        hist["l0"].append(tot_l0 / n)
        hist["dead"].append(int((since_fired >= cfg.dead_after).sum()))
        bar.set_postfix(loss=f"{hist['loss'][-1]:.4g}", l0=f"{hist['l0'][-1]:.1f}")
    with torch.no_grad():  # fold the normalisation: the SAE now reads and writes raw activations
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
    sae.act_scale = scale
    for p in sae.parameters():
        p.requires_grad_(False)
    hist.update(act_scale=scale, steps=step, d_sae=d_sae, wall_s=time.perf_counter() - t0,
                mse_space="normalised activations, summed over d_in, mean over inputs")
    return sae, hist


@torch.no_grad()
def sae_metrics(sae: SparseAutoencoder, acts: Any, batch_size: int = 4096) -> dict[str, Any]:
    """Quality on (held-out) activations: L0, explained variance, MSE, dead-latent share, with n.

    explained_variance = 1 - SSE / SST with SST the squared deviation from these activations' mean;
    mse is per coordinate in the caller's space; a latent is dead if it never fires on this set.
    Undefined values (n = 0, or zero variance) are NaN.
    """
    x = torch.as_tensor(acts)
    if x.dim() != 2 or (x.shape[0] and x.shape[1] != sae.d_in):
        raise ExciseError(f"sae_metrics needs activations [N, {sae.d_in}], got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    if n == 0:
        return {"n": 0, "d_sae": sae.d_sae, "l0": NAN, "explained_variance": NAN, "mse": NAN, "dead": 0, "dead_share": NAN}
    x = x.to(device=sae.W_enc.device, dtype=torch.float64)
    mean = x.mean(0)
    sse = sst = active = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    for s in range(0, n, batch_size):
        xb = x[s:s + batch_size]
        z = sae.encode(xb)
        x_hat = sae.decode(z).double()
        sse += float((x_hat - xb).pow(2).sum())
        sst += float((xb - mean).pow(2).sum())
        on = z > 0
        active += float(on.sum())
        fired |= on.any(0)
    dead = int((~fired).sum())
    return {"n": n, "d_sae": sae.d_sae, "l0": active / n,
            "explained_variance": 1.0 - sse / sst if sst > 0 else NAN,
            "mse": sse / (n * sae.d_in), "dead": dead, "dead_share": dead / sae.d_sae}
