"""Semi-nonnegative matrix factorisation (SNMF) of MLP activations -> forget-skill neurons.

Why: MLP hidden activations mix many skills in each neuron; SNMF (Ding, Li & Jordan, 2010)
factors them into features with *non-negative* per-token coefficients, so a feature reads as
"how much this token uses pattern k" (Shafran et al., 2025 apply it to MLP activations). Features
whose coefficients are high on forget tokens and low on retain tokens are the forget skill;
the neurons that carry those features index the rows of the down-projection (its input
dimensions: columns of ``down_proj.weight`` in PyTorch's [out, in] layout) that targeted UNDO
noises.

Factorisation: X [d_mlp, n_tokens] ~= F G^T, F [d_mlp, k] of any sign, G [n_tokens, k] >= 0,
multiplicative updates  F = X G (G^T G)^+,
G <- G * sqrt(((X^T F)^+ + G (F^T F)^-) / ((X^T F)^- + G (F^T F)^+)),  A^+- = (|A| +- A) / 2,
which never increase ||X - F G^T||_F and keep G non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.lm import lm_batch
from excise.locate.base import LOCALIZERS, LocateData
from excise.models.anatomy import Anatomy
from excise.trace import Trace
from excise.units import Scores
from excise.registry import Configured


@dataclass
class SNMFResult:
    F: Any  # [d, k] features in neuron space (any sign)
    G: Any  # [n, k] non-negative coefficients per token
    errors: list[float]  # relative reconstruction error ||X - F G^T|| / ||X|| after each iteration


def semi_nmf(X: Any, k: int, *, iters: int = 100, seed: int = 0, eps: float = 1e-9) -> SNMFResult:
    """Factor X [d, n] ~= F G^T with G >= 0 (Ding et al., 2010 updates)."""
    X = torch.as_tensor(X, dtype=torch.float64)
    if X.dim() != 2:
        raise ExciseError(f"semi_nmf needs a matrix, got shape {tuple(X.shape)}")
    d, n = X.shape
    if not 1 <= k <= min(d, n):
        raise ExciseError(f"semi_nmf rank k={k} must be in 1..{min(d, n)}")
    g = torch.Generator().manual_seed(seed)
    G = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    pos = lambda A: (A.abs() + A) / 2  # noqa: E731
    neg = lambda A: (A.abs() - A) / 2  # noqa: E731
    norm = float(X.norm()) or 1.0
    errors: list[float] = []
    F = X @ G @ torch.linalg.pinv(G.T @ G)
    for _ in range(iters):
        F = X @ G @ torch.linalg.pinv(G.T @ G)
        XtF = X.T @ F
        FtF = F.T @ F
        G = G * torch.sqrt((pos(XtF) + G @ neg(FtF)) / (neg(XtF) + G @ pos(FtF) + eps))
        errors.append(float((X - F @ G.T).norm()) / norm)
    return SNMFResult(F=F.float(), G=G.float(), errors=errors)


class SNMFConfig(BaseModel):
    """SNMF localizer settings."""

    model_config = {"extra": "forbid"}
    k: int = Field(16, ge=1, description="features per layer")
    iters: int = Field(100, ge=1, description="multiplicative-update iterations")
    n_forget_features: int = Field(4, ge=1, description="features per layer kept as 'forget skill' (highest forget-vs-retain contrast)")
    max_tokens: int = Field(4000, ge=16, description="cap on tokens factored per layer (forget and retain together)")
    seed: int = Field(0, description="seed of the initial coefficients")


def mlp_activations(handle: Any, tokenizer: Any, items: Sequence[Any], layers: Sequence[int],
                    batch_size: int = 64) -> dict[int, Any]:
    """``mlp.L.hidden`` at every real token of the items' full texts: {layer: [n_tokens, d_mlp]}."""
    sites = [f"mlp.{l}.hidden" for l in layers]
    out: dict[int, list] = {l: [] for l in layers}
    device = next(handle.model.parameters()).device
    with torch.inference_mode(), Trace(handle, sites) as tr:
        for s in range(0, len(items), batch_size):
            b = lm_batch(tokenizer, [it.text for it in items[s:s + batch_size]])
            mask = b["attention_mask"].bool()
            handle.model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
            for l in layers:
                out[l].append(tr.cache[f"mlp.{l}.hidden"].float().cpu()[mask])
    return {l: torch.cat(v, 0) for l, v in out.items()}


def snmf_scores(handle: Any, tokenizer: Any, forget: Sequence[Any], retain: Sequence[Any],
                cfg: SNMFConfig | None = None) -> Scores:
    """Neuron scores [n_layers, d_mlp]: how strongly each neuron carries the layer's forget features.

    Per layer: factor the pooled forget+retain token activations; a feature's contrast is
    ``(mean coef on forget - mean coef on retain) / (sum of both)``; the ``n_forget_features``
    features with the largest positive contrast score neurons by ``sum_k contrast_k * |F[:, k]|``.
    """
    cfg = cfg or SNMFConfig()
    if not forget or not retain:
        raise ExciseError("snmf_scores needs forget and retain items")
    an = handle.anatomy
    layers = list(range(an.n_layers))
    fa = mlp_activations(handle, tokenizer, forget, layers)
    ra = mlp_activations(handle, tokenizer, retain, layers)
    g = torch.Generator().manual_seed(cfg.seed)
    scores = torch.zeros(an.n_layers, an.d_mlp)
    meta: dict[str, Any] = {"errors": {}, "contrast": {}}
    for l in layers:
        f, r = fa[l], ra[l]
        half = cfg.max_tokens // 2
        if len(f) > half:
            f = f[torch.randperm(len(f), generator=g)[:half]]
        if len(r) > half:
            r = r[torch.randperm(len(r), generator=g)[:half]]
        X = torch.cat([f, r], 0).T  # [d_mlp, n]
        res = semi_nmf(X, min(cfg.k, min(X.shape)), iters=cfg.iters, seed=cfg.seed + l)
        mf, mr = res.G[: len(f)].mean(0), res.G[len(f):].mean(0)
        contrast = (mf - mr) / (mf + mr + 1e-9)
        top = torch.argsort(contrast, descending=True)[: cfg.n_forget_features]
        top = top[contrast[top] > 0]
        if len(top):
            scores[l] = (res.F[:, top].abs() * contrast[top]).sum(1)
        meta["errors"][l] = res.errors[-1]
        meta["contrast"][l] = contrast[top].tolist()
    return Scores(kind="neuron", values=scores, method="snmf", meta=meta)


def neuron_param_masks(model: Any, neuron_mask: Any) -> dict[str, Any]:
    """Map a neuron mask [n_layers, d_mlp] to parameter masks on the down-projections' input rows."""
    an = Anatomy.of(model)
    nm = torch.as_tensor(neuron_mask).float()
    if tuple(nm.shape) != (an.n_layers, an.d_mlp):
        raise ExciseError(f"neuron mask shape {tuple(nm.shape)} does not match the model ({an.n_layers}, {an.d_mlp})")
    masks = {}
    for l in range(an.n_layers):
        mod = an.mlp_down(l)
        name = an.module_name(mod) + ".weight"
        w = mod.weight
        m = torch.zeros(w.shape)
        if an.spec.mlp_down_transposed:
            m[nm[l].bool(), :] = 1.0
        else:
            m[:, nm[l].bool()] = 1.0
        masks[name] = m
    return masks


@LOCALIZERS.register
class SNMFLocalizer(Configured):
    """Semi-NMF features of MLP activations that separate forget from retain text, scored onto neurons."""

    name = "snmf"
    Config = SNMFConfig
    needs = ("forget", "retain")

    def score(self, handle: Any, data: LocateData) -> Scores:
        data.require(self.needs, self.name)
        return snmf_scores(handle, handle.tokenizer, list(data.forget), list(data.retain), self.config)
