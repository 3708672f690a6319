"""The two log-likelihood engines behind :func:`excise.lm.loglikelihood`, for any number of
continuations per context.

* **packed** (:func:`loglik_packed`): each row of a batch is the prefix tree (trie) of its
  requests' token sequences ``context + continuation[:-1]`` -- a context once for all its
  continuations, tokens shared by several continuations (" The ...") once, and the common start
  of contexts that share a row (:func:`share_rows`) once. A float 4D attention mask lets each
  token see its ancestors in the tree and itself, its position id is its depth, so every token
  sees exactly the sequence it would see alone; the LM head runs only where a next token is
  scored (``logits_to_keep`` as a boolean [B, T] mask). Applies where :func:`packed_ok` holds.
* **KV cache** (:func:`loglik_kv`): contexts run once, left-padded with explicit position ids,
  with ``use_cache=True``; the cache is repeated once per continuation and the continuations
  (right-padded) run against it. Differentiable (callers wrap it in ``torch.inference_mode``
  when they do not need gradients); the fallback for every model the packed path does not cover
  and the engine of :func:`excise.lm.choice_logprobs`.

Both return one summed log-probability per (request, continuation), flattened in request order.
Internal: the public entry points are in :mod:`excise.lm`.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np
import torch

from transformers.modeling_outputs import CausalLMOutputWithPast

from excise.models.load import last_logits_only

try:  # transformers >= 4.48; older versions have no masking_utils and take the KV-cache path
    from transformers import masking_utils
except ImportError:  # pragma: no cover
    masking_utils = None

# transformers 5.24 renamed the key/value cache argument and output field ``past_key_values`` -> ``cache``
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
SHARE_MIN_TOKENS = 8  # requests whose contexts share at least this many leading tokens may share a row
SHARE_MAX_NODES = 512  # ... while the row stays this short (attention cost grows with the square)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` (under a peft wrapper, the base model's) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def packed_ok(model: Any) -> bool:
    """Whether the packed path applies: the model's modeling code builds its mask with transformers'
    ``masking_utils.create_causal_mask`` (which passes a user 4D mask through unchanged), attention
    is ``eager`` or ``sdpa`` (both add a float 4D mask to the scores; flash attention takes no 4D
    mask, flex wants a BlockMask) and ``forward`` takes ``logits_to_keep``. In transformers 5 that
    holds for every family in ``excise.testing.DECODERS`` and ``EXTRA_DECODERS`` (llama, qwen2/3,
    mistral, gemma, gemma2, phi3, gpt2, gpt_neox, olmo/olmo2, smollm3); other models (and wrappers
    such as DDP), and flash/flex attention, use the KV-cache path. Sliding-window families stay
    packed only while a sequence fits in the window (a custom mask replaces the window), checked
    per batch."""
    if masking_utils is None:  # pragma: no cover
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    mod = inspect.getmodule(type(base))
    if getattr(mod, "create_causal_mask", None) is not masking_utils.create_causal_mask:
        return False
    if getattr(base.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    alibi = any("alibi" in name and callable(getattr(mod, name)) for name in dir(mod))
    if alibi and getattr(base.config, "alibi", True):
        return False  # ALiBi positions (bloom, mpt; falcon with alibi=True) come from the 2D mask: no 4D mask
    return takes_logits_to_keep(base)


def sliding_window(model: Any) -> int | None:
    cfg = model.config
    w = getattr(cfg, "sliding_window", None)
    if w is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(w)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tree_size(p_lists: list[list[int]], o_lists: list[list[list[int]]], row: Sequence[int]) -> int:
    """Tokens in a row's prefix tree (see :func:`loglik_packed`)."""
    nodes: set[tuple[int, ...]] = set()
    for i in row:
        p = tuple(p_lists[i])
        nodes.update(p[:k] for k in range(1, len(p) + 1))
        for o in o_lists[i]:
            nodes.update(p + tuple(o[:k]) for k in range(1, len(o)))
    return len(nodes)


def share_rows(p_lists: list[list[int]], batch_size: int) -> list[list[int]]:
    """Group requests into packed rows: in token order, a request joins the previous one's row when
    their contexts share >= SHARE_MIN_TOKENS leading tokens (full BBQ: an ambiguous context is the
    start of its disambiguated one, and each context has two questions, so ~4 items share ~half
    their tokens; the full BBQ then packs into ~half the tokens), up to ``batch_size`` requests and
    ~SHARE_MAX_NODES tokens per row."""
    order = sorted(range(len(p_lists)), key=lambda i: p_lists[i])
    rows: list[list[int]] = []
    tokens = 0
    for i in order:
        if rows:
            prev = rows[-1]
            shared = _common_prefix(p_lists[prev[-1]], p_lists[i])
            if (shared >= SHARE_MIN_TOKENS and len(prev) < batch_size
                    and tokens + len(p_lists[i]) - shared <= SHARE_MAX_NODES):
                prev.append(i)
                tokens += len(p_lists[i]) - shared
                continue
        rows.append([i])
        tokens = len(p_lists[i])
    return rows


def plan_batches(p_lists: list[list[int]], o_lists: list[list[list[int]]], batch_size: int,
                 packed: bool) -> list[list[list[int]]]:
    """Batches of rows (lists of request indices): shared rows when packed, one request per row
    otherwise; rows sorted by tree size (batches of similar length waste less compute on padding)
    and filled up to ``batch_size`` requests."""
    rows = share_rows(p_lists, batch_size) if packed else [[i] for i in range(len(p_lists))]
    size = {tuple(r): tree_size(p_lists, o_lists, r) for r in rows}
    rows.sort(key=lambda r: size[tuple(r)])
    batches: list[list[list[int]]] = []
    for r in rows:
        if batches and sum(map(len, batches[-1])) + len(r) <= batch_size:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


def loglik_packed(model: Any, rows: list[list[int]], p_lists: list[list[int]], o_lists: list[list[list[int]]],
                  device: Any) -> np.ndarray:
    """Score the requests of ``rows`` (lists of request indices, one packed row each) in one forward
    pass; returns the flat float64 log-likelihoods of their continuations, in the order of
    ``[(i, j) for r in rows for i in r for j in range(len(o_lists[i]))]``. Same numbers as one
    pass per continuation (see the module docstring)."""
    B = len(rows)
    toks, parents, depths = [], [], []
    src: list[tuple[int, int]] = []  # (row, node) whose next-token distribution scores a token
    tgt: list[int] = []
    owner: list[int] = []  # flat (request, continuation) slot
    slot = 0
    for b, row in enumerate(rows):
        tok_b: list[int] = []
        par_b: list[int] = []
        dep_b: list[int] = []
        child: dict[tuple[int, int], int] = {}

        def node(parent: int, t: int) -> int:
            key = (parent, t)
            if key not in child:
                child[key] = len(tok_b)
                tok_b.append(t)
                par_b.append(parent)
                dep_b.append(dep_b[parent] + 1 if parent >= 0 else 0)
            return child[key]

        for i in row:
            cur = -1
            for t in p_lists[i]:
                cur = node(cur, t)
            p_last = cur
            for o in o_lists[i]:
                cur = p_last
                for k, t in enumerate(o):
                    src.append((b, cur))
                    tgt.append(t)
                    owner.append(slot)
                    if k < len(o) - 1:
                        cur = node(cur, t)
                slot += 1
        toks.append(tok_b), parents.append(par_b), depths.append(dep_b)
    T = max(len(t) for t in toks)
    ids = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    allowed = np.zeros((B, T, T), dtype=bool)
    for b in range(B):
        n = len(toks[b])
        ids[b, :n] = toks[b]
        pos[b, :n] = depths[b]
        anc = allowed[b]
        for q, par in enumerate(parents[b]):  # parents come before children: ancestors(q) = ancestors(parent) + q
            if par >= 0:
                anc[q, :n] = anc[par, :n]
            anc[q, q] = True
        anc[np.arange(n, T), np.arange(n, T)] = True  # padding attends to itself: no empty softmax rows
    keep = np.zeros((B, T), dtype=bool)
    s = np.array(src, dtype=np.int64)
    keep[s[:, 0], s[:, 1]] = True
    flat = (keep.reshape(-1).cumsum() - 1).reshape(B, T)  # kept (row, node) -> row of the [n_keep, V] logits
    lp_rows = torch.from_numpy(flat[s[:, 0], s[:, 1]]).to(device)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, T, T), dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(dtype).min)
    with torch.inference_mode():
        res = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=mask.to(device),
                    position_ids=torch.from_numpy(pos).to(device), logits_to_keep=torch.from_numpy(keep).to(device),
                    use_cache=False)
        logits = res.logits.reshape(-1, res.logits.shape[-1])  # [n_keep, V]
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok_lp = lp[lp_rows, torch.tensor(tgt, device=device)].double().cpu()
    total = torch.zeros(slot, dtype=torch.float64).index_add_(0, torch.tensor(owner), tok_lp)
    return total.numpy()


def pad(seqs: Sequence[Sequence[int]], *, side: str, device: Any, pad_id: int = 0):
    """[B, T] ids and attention mask of unpadded id lists, padded on ``side``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def loglik_kv(model: Any, p_lists: list[list[int]], o_lists: list[list[list[int]]], device: Any) -> torch.Tensor:
    """Flat float32 log-likelihoods [sum of continuation counts] of each request's continuations,
    through a KV cache: contexts once (left-padded, explicit position ids, ``use_cache=True``),
    the cache repeated once per continuation, the continuations (right-padded) against it.
    Differentiable; ``model`` may be any wrapper whose forward passes the keyword arguments on."""
    counts = [len(o) for o in o_lists]
    n_cont = sum(counts)
    p_ids, p_mask = pad(p_lists, side="left", device=device)
    o_ids, o_mask = pad([o for os_ in o_lists for o in os_], side="right", device=device)
    p_pos = (p_mask.long().cumsum(1) - 1).clamp(min=0)
    # only the last position's logits are read: skip the LM head elsewhere (-15% CPU time)
    res = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, **last_logits_only(model))
    last = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V] next-token after the context
    cache = getattr(res, CACHE)
    if len(set(counts)) == 1:
        k = counts[0]
        cache.batch_repeat_interleave(k)
        rep = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731
    else:
        index = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        cache.batch_select_indices(index)
        rep = lambda x: x.index_select(0, index)  # noqa: E731
    plen = rep(p_mask.sum(1))  # [n_cont]
    To = o_ids.shape[1]
    o_pos = plen[:, None] + torch.arange(To, device=o_ids.device)[None, :]
    mask = torch.cat([rep(p_mask), o_mask], dim=1)
    if To > 1:
        res2 = model(input_ids=o_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=o_pos[:, :-1],
                     use_cache=False, **{CACHE: cache})
        lp2 = torch.log_softmax(res2.logits.float(), dim=-1)  # [n_cont, To-1, V]
        tok_lp = lp2.gather(-1, o_ids[:, 1:, None])[..., 0]  # [n_cont, To-1]
    else:
        tok_lp = torch.zeros((n_cont, 0), device=o_ids.device)
    first = rep(last).gather(-1, o_ids[:, :1])  # [n_cont, 1]
    all_lp = torch.cat([first, tok_lp], dim=1) * o_mask.float()
    return all_lp.sum(1)
