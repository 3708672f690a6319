"""Unlearning objectives, on logits (and activations for RMU), shared by every workflow.

Batches follow the Hugging Face convention: ``labels`` equal ``input_ids`` on the tokens that
count and ``-100`` elsewhere; logits at position t predict token t+1. Sources:

* gradient ascent: maximise the forget NLL (Jang et al., 2023).
* GradDiff: ascent on forget + descent on retain (Liu et al., 2022; TOFU).
* MaxEnt: push the forget predictions to uniform (KL(U || p)), as in the UNDO paper's baseline.
* NPO: ``-(2/beta) * log sigmoid(-beta * (log p - log p_ref))`` (Zhang et al., 2024), beta = 0.1.
* RMU: steer forget activations at one layer to a scaled random direction, keep retain
  activations where the frozen model had them (Li et al., 2024, WMDP).
* KL-to-reference retain term: forward KL(p_ref || p) on retain tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    return logits, labels.masked_fill(~mask, 0), mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label token) per sequence over the counted tokens: [B]."""
    lg, lb, mask = _shift(logits, labels)
    lp = torch.log_softmax(lg, -1).gather(-1, lb.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood over counted tokens (the usual LM loss)."""
    lg, lb, mask = _shift(logits, labels)
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="none").view_as(lb)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def grad_ascent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minimising this maximises the forget NLL."""
    return -nll(logits, labels)


def grad_diff(forget_logits, forget_labels, retain_logits, retain_labels, retain_weight: float = 1.0) -> torch.Tensor:
    return -nll(forget_logits, forget_labels) + retain_weight * nll(retain_logits, retain_labels)


def maxent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(uniform || p) averaged over counted tokens: 0 when the model is maximally unsure."""
    lg, _, mask = _shift(logits, labels)
    logp = torch.log_softmax(lg, -1)
    V = lg.shape[-1]
    kl = (-logp.mean(-1) - torch.log(torch.tensor(float(V), device=lg.device)))  # KL(U||p) = -log V - mean log p
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def npo(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation; ``ref_logits`` from the frozen model (no grad)."""
    logp = sequence_logprob(logits, labels)
    with torch.no_grad():
        ref = sequence_logprob(ref_logits.detach(), labels)
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref)).mean()


def kl_to_ref(logits: torch.Tensor, ref_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(p_ref || p) per token, averaged over real tokens: 0 for identical models."""
    logp = torch.log_softmax(logits.float(), -1)
    logq = torch.log_softmax(ref_logits.detach().float(), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    if attention_mask is None:
        return kl.mean()
    m = attention_mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def rmu(forget_act: torch.Tensor, retain_act: torch.Tensor, frozen_retain_act: torch.Tensor, control: torch.Tensor,
        alpha: float = 100.0, forget_mask: torch.Tensor | None = None, retain_mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMU on one layer's residual activations [B, T, D]; ``control`` = c * u (u a fixed random unit vector)."""

    def mse(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        se = (a.float() - b.float()).pow(2).mean(-1)
        if m is None:
            return se.mean()
        m = m.to(se.dtype)
        return (se * m).sum() / m.sum().clamp(min=1)

    return mse(forget_act, control.expand_as(forget_act), forget_mask) + alpha * mse(retain_act, frozen_retain_act.detach(), retain_mask)
