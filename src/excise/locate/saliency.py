"""Where a concept lives: gradient x activation and Fisher scores at MLP neurons and heads.

Why activations and not weights: a neuron (a hidden unit of the MLP, i.e. one input of the
down-projection, site ``mlp.L.hidden``) or a head (its slice of ``attn.L.z``) is the unit a
masked intervention acts on, so scoring it directly gives the mask.

* ``saliency``: |sum over answer tokens of dL/da * a| per unit -- the first-order estimate of
  the loss change if the unit were zeroed (attribution patching; Syed et al., 2023), averaged
  over prompts.
* ``fisher``: mean over prompts of (sum over tokens of dL/da)^2 -- the empirical Fisher
  information of the forget loss w.r.t. the unit's activation (as in Fisher-masked unlearning).
* ``activation``: mean |a| on forget prompts (no gradient), the plain activation trace.

L is the NLL of the revealing answer (teacher-forced). With ``contrast="difference"`` the same
score on retain prompts (each normalised by its mean) is subtracted, so units that matter for
everything (e.g. massive-activation neurons) are not picked -- in the spirit of selective
pruning (Pochinkov & Schoots, 2024), which ranks units by forget importance relative to retain.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.locate.base import LOCALIZERS, LocateData
from excise.losses import nll
from excise.select import Mask
from excise.tasks.concepts import encode_items
from excise.trace import Edit, Trace
from excise.units import Scores
from excise.registry import Configured
from excise.train import requires_grad

METHODS = ("saliency", "fisher", "activation")


class SaliencyConfig(BaseModel):
    """How to score units."""

    model_config = {"extra": "forbid"}
    method: Literal["saliency", "fisher", "activation"] = Field("saliency", description="scoring rule (see module doc)")
    contrast: Literal["none", "difference"] = Field(
        "difference", description="difference: subtract the mean-normalised retain score; none: forget score only")
    batch_size: int = Field(8, ge=1, description="prompts per forward/backward pass")


def _unit_stats(handle: Any, batch: dict, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example scores [B, L, d_mlp] and [B, L, H] for one batch."""
    an = handle.anatomy
    L, H = an.n_layers, an.n_heads
    # scale-by-1 edits put the per-head view of attn.L.z on the autograd path (exact: x * 1.0)
    edits = [Edit(f"attn.{l}.z", "scale", 1.0) for l in range(L)]
    sites = [f"mlp.{l}.hidden" for l in range(L)] + [f"attn.{l}.z" for l in range(L)]
    model = handle.model
    mask = batch["attention_mask"]
    lab_pos = torch.zeros_like(mask, dtype=torch.float32)
    lab_pos[:, :-1] = (batch["labels"][:, 1:] != -100).float()  # positions that predict an answer token
    if method == "activation":
        with torch.no_grad(), Trace(handle, sites, pool="all") as tr:
            model(input_ids=batch["input_ids"], attention_mask=mask)
        w = mask.float().unsqueeze(-1)
        neur = torch.stack([(tr.cache[f"mlp.{l}.hidden"].abs() * w).sum(1) / w.sum(1) for l in range(L)], 1)
        head = torch.stack([(tr.cache[f"attn.{l}.z"].norm(dim=-1) * w).sum(1) / w.sum(1) for l in range(L)], 1)
        return neur.float(), head.float()
    # frozen weights: the embedding output is made a leaf that requires grad, so activations carry a graph
    with torch.enable_grad(), Trace(handle, sites, edits, pool="all", detach=False, grad_from_embeddings=True) as tr:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        loss = nll(logits, batch["labels"]) * batch["labels"].shape[0]  # per-example sums, not a batch mean
        acts = [tr.cache[s] for s in sites]
        grads = torch.autograd.grad(loss, acts)
    # only positions up to the last answer-predicting token can influence the loss; sum over time
    neur, head = [], []
    for i, s in enumerate(sites):
        a, g = acts[i].detach().float(), grads[i].float()
        w = mask.float().view(mask.shape[0], mask.shape[1], *([1] * (a.dim() - 2)))
        if method == "saliency":
            v = (g * a * w).sum(1)  # [B, F] or [B, H, Dh]
            v = v.sum(-1).abs() if s.endswith(".z") else v.abs()
        else:  # fisher
            v = (g * w).sum(1)
            v = v.pow(2).sum(-1) if s.endswith(".z") else v.pow(2)
        (head if s.endswith(".z") else neur).append(v)
    return torch.stack(neur, 1), torch.stack(head, 1)


def _score_batches(handle: Any, batches: Sequence[dict], method: str) -> tuple[torch.Tensor, torch.Tensor]:
    tot_n, tot_h, n = None, None, 0
    for b in batches:
        sn, sh = _unit_stats(handle, b, method)
        tot_n = sn.sum(0) if tot_n is None else tot_n + sn.sum(0)
        tot_h = sh.sum(0) if tot_h is None else tot_h + sh.sum(0)
        n += sn.shape[0]
    return tot_n / n, tot_h / n


def score_units(handle: Any, forget: Sequence[Any], retain: Sequence[Any] = (), cfg: SaliencyConfig | None = None,
                *, forget_responses: Sequence[str] | None = None) -> dict[str, Scores]:
    """Scores for ``neuron`` [n_layers, d_mlp] and ``head`` [n_layers, n_heads] units.

    ``forget``/``retain`` are concept items (prompt + response); the loss is the NLL of each
    item's target response. The model is left unchanged (no parameter gradients are kept).
    """
    cfg = cfg or SaliencyConfig()
    if not forget:
        raise ExciseError("score_units needs at least one forget item")
    if cfg.contrast == "difference" and not retain:
        raise ExciseError("contrast 'difference' needs retain items; pass some or set contrast: none")
    model = handle.model
    was_training = model.training
    model.eval()
    with requires_grad(model, False):
        try:
            def batches(items, responses=None):
                return [encode_items(handle, list(items[s:s + cfg.batch_size]),
                                     responses[s:s + cfg.batch_size] if responses is not None else None)
                        for s in range(0, len(items), cfg.batch_size)]

            fn, fh = _score_batches(handle, batches(list(forget), forget_responses), cfg.method)
            meta: dict[str, Any] = {"n_forget": len(forget), "n_retain": len(retain), "contrast": cfg.contrast}
            if cfg.contrast == "difference":
                rn, rh = _score_batches(handle, batches(list(retain)), cfg.method)
                eps = 1e-12
                fn_, rn_ = fn / (fn.mean() + eps), rn / (rn.mean() + eps)
                fh_, rh_ = fh / (fh.mean() + eps), rh / (rh.mean() + eps)
                neuron, head = fn_ - rn_, fh_ - rh_
            else:
                neuron, head = fn, fh
        finally:
            if was_training:
                model.train()
    return {"neuron": Scores("neuron", neuron.cpu(), method=cfg.method, meta=meta),
            "head": Scores("head", head.cpu(), method=cfg.method, meta=meta)}


def random_scores(like: Scores, seed: int = 0) -> Scores:
    """Uniform random scores of the same shape: the control for 'does localization matter?'."""
    g = torch.Generator().manual_seed(seed)
    return Scores(like.kind, torch.rand(like.values.shape, generator=g), method="random", meta={"seed": seed})


def random_mask_like(mask: Any, seed: int = 0) -> Any:
    """A random mask with the same number of units in every layer as ``mask`` (same size, same layers)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask.values)
    for l in range(mask.values.shape[0]):
        k = int(mask.values[l].sum())
        if k:
            out[l, torch.randperm(mask.values.shape[1], generator=g)[:k]] = True
    return Mask(kind=mask.kind, values=out)


class SaliencyLocalizerConfig(SaliencyConfig):
    """Saliency settings plus the unit kind to return."""

    unit: Literal["neuron", "head"] = Field("neuron", description="neuron: MLP hidden units; head: attention heads")


@LOCALIZERS.register
class SaliencyLocalizer(Configured):
    """Gradient saliency (or Fisher / activation trace) of the forget responses at neurons or heads."""

    name = "saliency"
    Config = SaliencyLocalizerConfig
    needs = ("forget",)

    def score(self, handle: Any, data: LocateData) -> Scores:
        data.require(self.needs + (("retain",) if self.config.contrast == "difference" else ()), self.name)
        cfg = SaliencyConfig(**self.config.model_dump(exclude={"unit"}))
        return score_units(handle, list(data.forget), list(data.retain), cfg)[self.config.unit]


class RandomConfig(BaseModel):
    """Settings of the random control."""

    model_config = {"extra": "forbid"}
    unit: Literal["neuron", "head"] = Field("neuron", description="unit kind to score")
    seed: int = Field(0, description="seed of the uniform scores")


@LOCALIZERS.register
class RandomLocalizer(Configured):
    """Uniform random scores: the control every localizer is compared with (random units of equal count)."""

    name = "random"
    Config = RandomConfig
    needs: tuple[str, ...] = ()

    def score(self, handle: Any, data: LocateData) -> Scores:
        an = handle.anatomy
        width = an.n_heads if self.config.unit == "head" else an.d_mlp
        g = torch.Generator().manual_seed(self.config.seed)
        return Scores(self.config.unit, torch.rand((an.n_layers, width), generator=g), method="random",
                      meta={"seed": self.config.seed})
