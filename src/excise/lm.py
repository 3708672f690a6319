"""The execution layer's language-model backend: every task's scoring and generation goes through here.

Tasks emit requests, this module serves them (as lm-evaluation-harness separates tasks from the
model backend); no task or metric owns a scoring loop.

* :func:`loglikelihood`: summed log-probability of each continuation of each :class:`LoglikRequest`
  (any number of continuations per context), batched, in one forward pass per batch on the packed
  prefix-tree path where the model allows it, else against a repeated KV cache
  (:mod:`excise.lm_packed`). :func:`loglikelihood_naive` is the one-pass-per-continuation
  reference the tests compare against.
* :func:`token_loglikelihood`: the per-token log-probabilities behind :func:`loglikelihood` (min-k%).
* :func:`choice_logprobs`: the same quantity as a differentiable [N, K] tensor, for training
  objectives and gradient-based localizers.
* :func:`next_token_logprobs`: the probability that the next token is one of a set of token ids
  (lettered multiple choice).
* :func:`generate`: greedy continuations, batched with left padding; :func:`generate_with_images` the
  same for a vision-language model's (prompt, image) pairs, batched by its processor.
* :func:`lm_batch`: a right-padded training batch with Hugging Face ``-100`` labels.

Tokenization is the same everywhere: a context gets the tokenizer's special tokens unless it
already starts with one (a chat-formatted prompt, :func:`excise.models.load.add_special_tokens_for`,
decided per context); a continuation is tokenized on its own, without special tokens, and its ids
are appended to the context's (never re-tokenized together), so the scored span is exactly the
continuation whatever the tokenizer does at the boundary.

``handle`` is anything with a ``tokenizer`` and a ``model`` (a :class:`excise.models.ModelHandle`,
or :class:`Backend` for a bare model + tokenizer pair); ``model=`` overrides the handle's model
(a peft or DDP wrapper, a model being trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from excise import lm_packed as packing
from excise.errors import ExciseError
from excise.models.load import add_special_tokens_for

Normalize = Literal["none", "tokens", "chars"]
NORMALIZE = ("none", "tokens", "chars")
IGNORE = -100  # Hugging Face's ignored label id
_CHUNK = 64  # texts per tokenizer call


@dataclass(frozen=True)
class LoglikRequest:
    """A context and the continuations whose log-likelihood after it is wanted (K >= 1)."""

    context: str
    continuations: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.continuations, str) or len(self.continuations) == 0:
            raise ExciseError("a LoglikRequest needs a tuple of one or more continuations")


@dataclass(frozen=True)
class Backend:
    """A bare model and its tokenizer, for callers without a ModelHandle."""

    model: Any
    tokenizer: Any


def _model(handle: Any, model: Any) -> Any:
    return model if model is not None else handle.model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _bar(it: Iterable, progress: bool, desc: str, total: int | None = None) -> Iterable:
    return tqdm(it, desc=desc, unit="batch", total=total) if progress else it


# ============================================================================ tokenization

def encode(tokenizer: Any, texts: Sequence[str], *, special: bool | Sequence[bool]) -> list[list[int]]:
    """Unpadded token id lists; ``special``: add the tokenizer's special tokens (one flag, or one per text)."""
    flags = [special] * len(texts) if isinstance(special, bool) else list(special)
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, f in enumerate(flags) if f == flag]
        for s in range(0, len(idx), _CHUNK):  # one padded tensor per chunk, unpadded by its mask
            part = idx[s:s + _CHUNK]
            enc = tokenizer([texts[i] for i in part], return_tensors="pt", padding=True, padding_side="right",
                            add_special_tokens=flag)
            for i, r, m in zip(part, enc["input_ids"], enc["attention_mask"]):
                out[i] = r[m.bool()].tolist()
    return out


def encode_contexts(tokenizer: Any, contexts: Sequence[str]) -> list[list[int]]:
    """Context ids, with special tokens unless a context already starts with one."""
    return encode(tokenizer, contexts, special=[add_special_tokens_for([c]) for c in contexts])


def encode_requests(tokenizer: Any, requests: Sequence[LoglikRequest]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(context ids per request, continuation ids per request and continuation)."""
    p_lists = encode_contexts(tokenizer, [r.context for r in requests])
    flat = encode(tokenizer, [c for r in requests for c in r.continuations], special=False)
    o_lists: list[list[list[int]]] = []
    k = 0
    for n, r in enumerate(requests):
        o_lists.append(flat[k:k + len(r.continuations)])
        k += len(r.continuations)
        if not p_lists[n]:
            raise ExciseError(f"request {n}: the context tokenizes to nothing ({r.context[:40]!r})")
        for j, o in enumerate(o_lists[-1]):
            if not o:
                raise ExciseError(f"request {n}: continuation {j} tokenizes to nothing ({r.continuations[j]!r})")
    return p_lists, o_lists


# ============================================================================ log-likelihood

def loglikelihood(handle: Any, requests: Sequence[LoglikRequest], *, batch_size: int = 8,
                  normalize: Normalize = "none", progress: bool = False, model: Any = None) -> list[np.ndarray]:
    """Log-probability of each continuation after its context: one float64 array [K_i] per request,
    in request order (``np.stack(result)`` gives [N, K] when every request has K continuations).

    ``normalize="tokens"`` divides by the continuation's token count, ``"chars"`` by its character
    count (lm-evaluation-harness's ``acc_norm``); ``"none"`` (default) is the summed log-likelihood.
    ``batch_size`` counts requests per forward pass. Requests run packed (several per row when their
    contexts share a start, see :func:`excise.lm_packed.share_rows`) or, where packing does not
    apply, against a repeated KV cache; both equal :func:`loglikelihood_naive` on the same ids.
    """
    if normalize not in NORMALIZE:
        raise ExciseError(f"unknown normalize '{normalize}'; choose none, tokens or chars")
    if batch_size < 1:
        raise ExciseError(f"batch_size must be >= 1, got {batch_size}")
    if not requests:
        return []
    model = _model(handle, model)
    device = _device(model)
    p_lists, o_lists = encode_requests(handle.tokenizer, requests)
    packed = packing.packed_ok(model)
    window = packing.sliding_window(model) if packed else None
    out: list[np.ndarray] = [np.zeros(len(o), dtype=np.float64) for o in o_lists]
    batches = packing.plan_batches(p_lists, o_lists, batch_size, packed)
    for batch in _bar(batches, progress, "loglik"):
        idx = [i for r in batch for i in r]
        longest = max(len(p_lists[i]) + max(len(o) for o in o_lists[i]) for i in idx)
        if packed and (window is None or longest <= window):
            flat = packing.loglik_packed(model, batch, p_lists, o_lists, device)
        else:
            with torch.inference_mode():
                flat = packing.loglik_kv(model, [p_lists[i] for i in idx], [o_lists[i] for i in idx],
                                         device).double().cpu().numpy()
        k = 0
        for i in idx:
            out[i] = flat[k:k + len(o_lists[i])]
            k += len(o_lists[i])
    if normalize == "tokens":
        out = [v / np.array([len(o) for o in os_], dtype=np.float64) for v, os_ in zip(out, o_lists)]
    elif normalize == "chars":
        out = [v / np.array([max(1, len(c)) for c in r.continuations], dtype=np.float64)
               for v, r in zip(out, requests)]
    return out


def loglikelihood_naive(handle: Any, requests: Sequence[LoglikRequest], *, model: Any = None) -> list[np.ndarray]:
    """Reference: one unpadded forward pass per (request, continuation) on context ids + continuation
    ids. Slow; for tests."""
    model = _model(handle, model)
    device = _device(model)
    tok = handle.tokenizer
    out = []
    for r in requests:
        p_ids = tok([r.context], return_tensors="pt",
                    add_special_tokens=add_special_tokens_for([r.context]))["input_ids"][0].tolist()
        row = np.zeros(len(r.continuations))
        for j, c in enumerate(r.continuations):
            o_ids = tok([c], return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()
            ids = torch.tensor([p_ids + o_ids], device=device)
            with torch.inference_mode():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            row[j] = sum(float(lp[len(p_ids) - 1 + k, t]) for k, t in enumerate(o_ids))
        out.append(row)
    return out


def token_loglikelihood(handle: Any, requests: Sequence[LoglikRequest], *, batch_size: int = 16,
                   model: Any = None) -> list[np.ndarray]:
    """Per-token log-probabilities of each request's first continuation, tokenized exactly as
    :func:`loglikelihood` does (their sum equals it): membership-inference scores such as min-k%
    need the tokens, not the sum."""
    model = model if model is not None else handle.model
    device = next(model.parameters()).device
    p_lists, o_lists = encode_requests(handle.tokenizer, requests)
    seqs = [p + o[0] for p, o in zip(p_lists, o_lists)]
    out: list[np.ndarray] = []
    pad_id = handle.tokenizer.pad_token_id or 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = packing.pad(seqs[s:s + batch_size], side="right", device=device, pad_id=pad_id)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i in range(ids.shape[0]):
            n_p, o = len(p_lists[s + i]), o_lists[s + i][0]
            pos = torch.arange(n_p - 1, n_p - 1 + len(o), device=device)
            out.append(lp[i, pos, torch.tensor(o, device=device)].double().cpu().numpy())
    return out


def choice_logprobs(handle: Any, prompts: Sequence[str], options: Sequence[Sequence[str]], *,
                    model: Any = None, length_norm: bool = False) -> torch.Tensor:
    """Log-likelihood of each option after its prompt, [N, K] (the same K for every prompt),
    differentiable (the KV-cache engine without ``inference_mode``; one forward pass for the
    prompts, one for the options).

    Prompts are left-padded so they end together; their key/value cache is repeated K times for
    the options (right-padded), with explicit position ids so padding never shifts positions.
    ``length_norm`` averages over each option's tokens instead of summing. ``model`` overrides
    ``handle.model`` (e.g. a DDP wrapper or a model being trained).
    """
    n, k = len(prompts), len(options[0]) if options else 0
    if len(options) != n or any(len(o) != k for o in options) or k == 0:
        raise ExciseError("every example needs the same number (>= 1) of options")
    model = _model(handle, model)
    p_lists, o_lists = encode_requests(handle.tokenizer, [LoglikRequest(p, tuple(o)) for p, o in zip(prompts, options)])
    total = packing.loglik_kv(model, p_lists, o_lists, _device(model))
    if length_norm:
        total = total / torch.tensor([len(o) for os_ in o_lists for o in os_], device=total.device)
    return total.view(n, k)


def next_token_logprobs(handle: Any, contexts: Sequence[str], token_sets: Sequence[Sequence[int]], *,
                        batch_size: int = 8, progress: bool = False, model: Any = None) -> np.ndarray:
    """Log-probability that the token after each context is one of each set of ids: float64
    [N, len(token_sets)] (the probabilities within a set are summed, e.g. "A" and " A").
    Contexts are left-padded in batches of ``batch_size``, with explicit position ids."""
    if batch_size < 1:
        raise ExciseError(f"batch_size must be >= 1, got {batch_size}")
    model = _model(handle, model)
    device = _device(model)
    ids_all = encode_contexts(handle.tokenizer, contexts)
    out = np.zeros((len(contexts), len(token_sets)))
    for start in _bar(range(0, len(contexts), batch_size), progress, "next-token",
                      total=-(-len(contexts) // batch_size)):
        ids, mask = packing.pad(ids_all[start:start + batch_size], side="left", device=device)
        with torch.inference_mode():
            pos = (mask.long().cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            lp = torch.log_softmax(logits, -1)
            cols = [torch.logsumexp(lp[:, list(c)], dim=-1) for c in token_sets]
        out[start:start + len(ids)] = torch.stack(cols, 1).double().cpu().numpy()
    return out


# ============================================================================ generation

def generate(handle: Any, prompts: Sequence[str], *, max_new_tokens: int = 24, batch_size: int = 8,
             progress: bool = False, model: Any = None) -> list[str]:
    """Greedy continuations of each prompt, decoded without special tokens (not stripped), in order.

    Prompts are sorted by token length and batched (``batch_size`` per ``model.generate`` call, left
    padding; equal-length prompts need none), so results do not depend on the order given.
    Generation stops at the tokenizer's end-of-sequence token (else the model's) or after
    ``max_new_tokens``. The model is put in eval mode for the call and restored after.
    """
    if batch_size < 1:
        raise ExciseError(f"batch_size must be >= 1, got {batch_size}")
    model = _model(handle, model)
    gen_model = model.module if isinstance(model, DistributedDataParallel) else model  # DDP has no .generate
    device = _device(model)
    tok = handle.tokenizer
    ids_all = encode_contexts(tok, prompts)
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    kw: dict[str, Any] = {"eos_token_id": eos} if eos is not None else {}
    order = sorted(range(len(prompts)), key=lambda i: len(ids_all[i]))
    out = [""] * len(prompts)
    lean = _lean_greedy_ok(gen_model)
    was_training = model.training
    model.eval()
    try:
        for s in _bar(range(0, len(order), batch_size), progress, "generate", total=-(-len(order) // batch_size)):
            chunk = order[s:s + batch_size]
            ids, mask = packing.pad([ids_all[i] for i in chunk], side="left", device=device, pad_id=pad)
            with torch.inference_mode():
                if lean:
                    new = _greedy(gen_model, ids, mask, max_new_tokens, eos)
                else:
                    new = gen_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                             do_sample=False, pad_token_id=pad, **kw)[:, ids.shape[1]:]
            for i, row in zip(chunk, new):
                out[i] = tok.decode(_until_eos(row, eos), skip_special_tokens=True)
    finally:
        if was_training:
            model.train()
    return out


def generate_with_images(handle: Any, prompts: Sequence[str], images: Sequence[Any], *, max_new_tokens: int = 24,
                         batch_size: int = 16, progress: bool = False, model: Any = None) -> list[str]:
    """Greedy continuations of (prompt, image) pairs from a vision-language model, in order.

    The handle's processor builds each batch (image tokens, pixel values, left padding), so every
    family's image-token convention is its own; ``model.generate`` decodes (``do_sample=False``).
    """
    if len(prompts) != len(images):
        raise ExciseError(f"{len(prompts)} prompts but {len(images)} images")
    if batch_size < 1:
        raise ExciseError(f"batch_size must be >= 1, got {batch_size}")
    processor = getattr(handle, "processor", None)
    if processor is None:
        raise ExciseError("generation from images needs a vision-language model handle with a processor")
    model = _model(handle, model)
    gen_model = model.module if isinstance(model, DistributedDataParallel) else model
    tok = handle.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    out: list[str] = []
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    try:
        for s in _bar(range(0, len(prompts), batch_size), progress, "caption", total=-(-len(prompts) // batch_size)):
            # one list of images per prompt: SmolVLM's processor needs it, the others accept it
            ims = [im if isinstance(im, (list, tuple)) else [im] for im in images[s:s + batch_size]]
            enc = processor(text=list(prompts[s:s + batch_size]), images=ims, return_tensors="pt",
                            padding=True).to(_device(model))
            with torch.inference_mode():
                new = gen_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                         **({"eos_token_id": eos} if eos is not None else {}))
            new = new[:, enc["input_ids"].shape[1]:]
            out += [tok.decode(_until_eos(row, eos), skip_special_tokens=True).strip() for row in new]
    finally:
        tok.padding_side = side
        if was_training:
            model.train()
    return out


# Generation settings under which greedy decoding is plain argmax (else model.generate applies processors).
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
            "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0)}


def _lean_greedy_ok(model: Any) -> bool:
    """Whether :func:`_greedy` equals ``model.generate(do_sample=False)``: a transformers decoder that takes
    ``logits_to_keep`` and a cache, whose generation config adds no logits processor. Else the
    caller uses ``model.generate`` (tests compare both on every decoder family)."""
    gc = getattr(model, "generation_config", None)
    if gc is None or not packing.takes_logits_to_keep(model):
        return False
    return all(getattr(gc, k, None) in ok for k, ok in _NEUTRAL.items())


def _greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    """Greedy decoding with the KV cache, LM head at the last position only: [B, <= max_new_tokens].

    ``model.generate`` spends most of its time in per-step bookkeeping for small models (the
    arithmetic organism decodes 5 tokens for 256 prompts per call); this loop is the same
    computation without it, and stops once every row has produced ``eos``."""
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, nxt = getattr(res, packing.CACHE), res.logits[:, -1].argmax(-1)
    last = pos[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = []
    for t in range(max_new_tokens):
        out.append(nxt)
        if eos is not None:
            done |= nxt == eos
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last = last + 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    logits_to_keep=1, **{packing.CACHE: cache})
        cache, nxt = getattr(res, packing.CACHE), res.logits[:, -1].argmax(-1)
    return torch.stack(out, 1)


def _until_eos(row: torch.Tensor, eos: int | None) -> torch.Tensor:
    """The generated tokens up to the first end-of-sequence token (what ``generate`` pads after)."""
    if eos is None:
        return row
    hit = (row == eos).nonzero()
    return row[: int(hit[0, 0]) + 1] if len(hit) else row


# ============================================================================ training batches

def lm_batch(tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
             prompts: Sequence[str] | None = None) -> dict:
    """Right-padded batch with HF-style labels (-100 on pads; on prompt tokens too when ``prompts`` given)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right",
                    truncation=max_length is not None, max_length=max_length, add_special_tokens=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, IGNORE)
    if prompts is not None:
        for i, p in enumerate(prompts):
            n = len(tokenizer(p, return_tensors="pt", padding=False, add_special_tokens=True)["input_ids"][0])
            labels[i, :n] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
