"""Sentence embeddings of encoders: mask-aware pooling and frozen-encoder embeddings (sentence-transformers style).

:func:`embed` serves the baselines on frozen embeddings and the counterfactual matching on
Grep-BiasIR (mean pooling over real tokens, then L2 normalisation, as all-MiniLM-L6-v2's
sentence-transformers pipeline does); :func:`pool` is also what
:class:`excise.intervene.fair_finetune.FairEncoder` uses for its embedding.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from excise.errors import ExciseError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """[B, T, d] -> [B, d]: mean over real tokens, or the first real token (left padding works too)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "cls":
        first = mask.long().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    raise ExciseError(f"unknown pooling '{how}'; choose mean or cls")


def accepted_inputs(model: Any) -> tuple[str, ...]:
    """Which of input_ids / attention_mask / token_type_ids the (base) encoder's forward takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return tuple(k for k in INPUTS if k in params)


@torch.no_grad()
def fit_length(model: Any, max_length: int | None) -> int | None:
    """``max_length`` capped at the positions the model has (RoBERTa-style models offset them by pad + 1)."""
    pos = getattr(model.config, "max_position_embeddings", None)
    if pos is None:
        return max_length
    usable = int(pos) - (int(model.config.pad_token_id) + 1 if getattr(model.config, "model_type", "") in
                         ("roberta", "xlm-roberta", "camembert") else 0)
    return usable if max_length is None else min(max_length, usable)


def embed(handle: Any, texts: Sequence[str], pooling: str = "mean", *, batch_size: int = 64,
          max_length: int | None = 256, normalize: bool = True) -> np.ndarray:
    """Frozen-encoder sentence embeddings [N, d]: pooled last hidden states, L2-normalised (sentence-transformers).

    ``max_length`` 256 is all-MiniLM-L6-v2's ``max_seq_length``.
    """
    model, tok = handle.model, handle.tokenizer
    inputs, device = accepted_inputs(model), next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    max_length = fit_length(model, max_length)
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=max_length is not None,
                      max_length=max_length, return_tensors="pt")
            batch = {k: enc[k].to(device) for k in inputs if k in enc}
            hidden = getattr(model(**batch), "last_hidden_state", None)
            if hidden is None:
                raise ExciseError(f"{handle.name}: the model returns no last_hidden_state; load it as an encoder")
            z = pool(hidden, batch["attention_mask"], pooling).float()
            out.append((F.normalize(z, dim=-1) if normalize else z).detach().cpu())
    finally:
        model.train(was)
    dim = int(model.config.hidden_size)
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


__all__ = ["INPUTS", "accepted_inputs", "embed", "fit_length", "pool"]
