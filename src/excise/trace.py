"""Trace: capture and edit activations at canonical sites with forward hooks.

Sites (``l`` is a layer index):

==================  =====================================================  ==================
site                what                                                    shape (pool="all")
==================  =====================================================  ==================
``resid.{l}``       residual stream after block ``l`` (block output)        [B, T, d_model]
``attn.{l}.z``      per-head attention outputs = input of the attention     [B, T, H, d_head]
                    output projection, split by head
``attn.{l}.pattern`` attention probabilities (needs eager attention)        [B, H, T, T]
``mlp.{l}.hidden``  input of the MLP down-projection (after activation)     [B, T, d_mlp]
``mlp.{l}.out``     output of the MLP down-projection; of a mixture of      [B, T, d_model]
                    experts: the whole block (shared experts included)
``mlp.{l}.router``  router logits of a mixture-of-experts layer             [B, T, n_experts]
``mlp.{l}.expert.{e}.hidden``  input of expert e's down-projection;          [B, T, d_expert]
                    zero at tokens not routed to e
``mlp.{l}.expert.{e}.out``     what expert e adds to the block: its          [B, T, d_model]
                    down-projection times the routing weight; zero where
                    unrouted (the experts' outs sum to the routed block)
``vision.{l}``      output of vision-tower block ``l`` (VLMs)                [B, P, d_vision]
``projector.out``   projector / connector output, as it enters the LM        [B, P', d_model]
==================  =====================================================  ==================

``P`` counts patches, CLS included where the family has one (LLaVA, CLIP); ``P'`` counts image
tokens. Expert sites keep the [B, T, ...] layout of every other site (zeros where a token was
not routed) rather than a ragged [n_routed, d]: pooling, ``positions``, patching and accumulation
then work unchanged, and ``mean`` gives the expert's average contribution per token (``mlp.L.router``
says which tokens were routed). transformers 5 fuses experts into [E, ...] tensors without a
module per expert, so expert captures are recomputed from those weights by a hook on the experts
module (:func:`excise.sites.expert_activations`; the test checks they sum to the block), and an
expert edit rescales its routing weights: ``scale`` and ``zero`` only, at ``mlp.L.expert.E.out``.
Qwen2-VL runs its tower on all images' patches concatenated: ``vision.{l}`` is
[N_patches, d_vision] and ``projector.out`` [N_tokens, d_model] there. CLIP's projector is the
image embedding, [B, projection_dim]. Idefics3 / SmolVLM have one row per image (tile).

Pooling (padding-aware, from the attention mask of the forward call): ``all`` keeps every
position; ``last`` takes the last real token; ``mean`` averages real tokens; ``cls`` takes
position 0. For patterns, pooling applies to the query axis. Vision sites ignore the mask (it
is the LM's): ``mean`` averages every patch, ``last`` takes the last; flat (Qwen2-VL) captures
pool per image, from the tower call's ``grid_thw``. A vision site needs a
:class:`~excise.models.anatomy.VisionAnatomy`, built only when one is asked for.

A Trace never converts or wraps the model: with nothing to capture or edit, no hook is
registered and logits are bit-identical to plain ``transformers``. Site names, edits and pooling
are :mod:`excise.sites` (re-exported here); streaming a whole dataset to disk is
:mod:`excise.trace_store`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy, VisionAnatomy
from excise.sites import (  # noqa: F401  (re-exported: the Trace's public vocabulary)
    MOE_KINDS,
    POOLS,
    SITE_KINDS,
    VISION_KINDS,
    Edit,
    Pool,
    Site,
    _apply_edit,
    _pool,
    _pool_vision,
    expand_sites,
    expert_activations,
    is_vision_site,
    parse_site,
    scale_expert,
)

def _ask_for_weights(module, args, kwargs):
    """Forward pre-hook: call an attention module with ``output_attentions=True``."""
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    if bound.arguments.get("output_attentions"):
        return None
    bound.arguments["output_attentions"] = True
    return bound.args, bound.kwargs


def _post_hook(module: torch.nn.Module, hook: Callable) -> Any:
    """Register a forward hook that runs before transformers' output recorders on the module.

    transformers 5 records ``output_hidden_states`` with forward hooks of its own, installed on first
    use; left before ours they would record the unedited output (LLaVA reads its image features
    from the vision tower's hidden_states). Hooks of other Traces keep their order.
    """
    handle = module.register_forward_hook(hook)
    hooks = module._forward_hooks
    for key in [k for k, fn in hooks.items() if getattr(fn, "__module__", "") == _RECORDER_MODULE]:
        hooks.move_to_end(key)
    return handle


_RECORDER_MODULE = "transformers.utils.output_capturing"


class Trace:
    """Capture and/or edit sites during forward passes of a model.

    >>> with Trace(handle, capture=["resid.*", "attn.3.z"], pool="last") as tr:
    ...     logits = handle.model(**batch).logits
    >>> tr.cache["attn.3.z"].shape   # [B, H, d_head]

    ``cache`` holds the captures of the latest forward pass (set ``accumulate=True`` to
    concatenate over passes along the batch axis; ``keep_passes=True`` keeps one cache per forward
    call in ``passes``, e.g. a prompt pass and an option pass through its KV cache). ``detach=False`` keeps the autograd graph
    (for gradient-based localizers; call ``retain_grad()`` on what you need). Gradients reach a
    capture only with ``pool="all"``: a pooled copy is not on the path to the output.
    """

    def __init__(
        self,
        handle: Any,
        capture: str | Iterable[str] = (),
        edits: Iterable[Edit] = (),
        *,
        pool: Pool = "all",
        detach: bool = True,
        to_cpu: bool = False,
        accumulate: bool = False,
        keep_passes: bool = False,
        grad_from_embeddings: bool = False,
    ) -> None:
        is_handle = hasattr(handle, "anatomy")
        self.model = handle.model if is_handle else handle
        if pool not in POOLS:
            raise ExciseError(f"unknown pooling '{pool}'; choose all, last, mean or cls")
        edits = list(edits)
        names = [p.strip() for p in capture.split(",")] if isinstance(capture, str) else list(capture)
        names += [e.site for e in edits]
        # a vision anatomy only when a vision site is asked for: text models never need one
        self.vision = None
        if any(is_vision_site(p) for p in names):
            self.vision = (handle.vision if is_handle and hasattr(type(handle), "vision") else None) \
                or VisionAnatomy.of(self.model)
        self.anatomy = handle.anatomy if is_handle else None
        if self.anatomy is None and (grad_from_embeddings or not (names and all(is_vision_site(p) for p in names))):
            self.anatomy = Anatomy.of(self.model)
        an = self.anatomy
        n = an.n_layers if an is not None else 0
        nv = self.vision.n_layers if self.vision is not None else None
        moe = dict(moe_layers=an.moe_layers, n_experts=an.n_experts) if an is not None else {}
        ne = moe.get("n_experts")
        self.capture_sites = [parse_site(s, n, nv, ne) for s in expand_sites(capture, n, nv, **moe)] if capture else []
        # an edit at ``attn.*.z`` applies at every layer; the caller's Edit objects are not mutated
        self.edits = [dataclasses.replace(e, site=s) for e in edits for s in expand_sites([e.site], n, nv, **moe)]
        for site in self.capture_sites + [parse_site(e.site) for e in self.edits]:
            if site.kind in MOE_KINDS:
                an.router(site.layer)  # raises on a dense layer
            elif site.kind == "mlp.hidden" and site.layer in an.moe_layers:
                an.mlp_down(site.layer)  # raises: an expert layer has no single down-projection
        for e in self.edits:  # fail before the forward pass, not inside a hook
            site = parse_site(e.site)
            if site.kind in MOE_KINDS:
                _check_moe_edit(e, site)
            if site.kind == "attn.pattern":
                raise ExciseError("attn.L.pattern is read-only: edit attn.L.z to change what a head writes")
            if e.heads is not None:
                if site.kind != "attn.z":
                    raise ExciseError(f"edit at {site.name}: 'heads' only applies to attn.L.z sites")
                bad = [h for h in e.heads if not 0 <= int(h) < self.anatomy.n_heads]
                if bad:
                    raise ExciseError(f"edit at {site.name}: heads {bad} out of range 0..{self.anatomy.n_heads - 1}")
        self.pool = pool
        self.detach = detach
        self.to_cpu = to_cpu
        self.accumulate = accumulate
        self.keep_passes = keep_passes
        self.grad_from_embeddings = grad_from_embeddings
        self.cache: dict[str, torch.Tensor] = {}
        self.passes: list[dict[str, torch.Tensor]] = []  # one cache per forward call (keep_passes=True)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None  # grid_thw of the latest vision-tower call (flat layouts)
        self._moe_bt: dict[int, tuple] = {}  # [B, T] of each sparse block's latest call
        if any(s.kind == "attn.pattern" for s in self.capture_sites):
            impl = getattr(self.model.config, "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ExciseError(
                    f"capturing attn.L.pattern needs eager attention, the model uses '{impl}'; "
                    "load it with attn_implementation='eager'"
                )

    # --- hooks -------------------------------------------------------------------------
    def _store(self, site: Site, x: torch.Tensor) -> None:
        if site.kind in VISION_KINDS:
            x = _pool_vision(x, self.pool, self.vision.image_lengths(self._grid, site.kind == "projector.out"))
        elif site.kind == "attn.pattern":
            x = _pool(x, self._mask, self.pool, time_dim=2)
        else:
            x = _pool(x, self._mask, self.pool, time_dim=1)
        if self.detach:
            x = x.detach()
        if self.to_cpu and x.device.type != "cpu":
            x = x.to("cpu")  # blocking: a non-blocking D2H copy may be read before it lands
        key = site.name
        if self.keep_passes and self.passes:
            self.passes[-1][key] = x
        if self.accumulate and key in self.cache:
            if self.pool == "all" and self.cache[key].shape[1:] != x.shape[1:]:
                raise ExciseError("accumulate=True with pool='all' needs equal sequence lengths; use pool='last' or 'mean'")
            self.cache[key] = torch.cat([self.cache[key], x], 0)
        else:
            self.cache[key] = x

    def _register(self) -> None:
        an = self.anatomy
        by_target: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: {"cap": [], "edit": []})
        for s in self.capture_sites:
            by_target[(s.kind, s.layer)]["cap"].append(s)
        for e in self.edits:
            s = parse_site(e.site)
            by_target[(s.kind, s.layer)]["edit"].append(e)
        if self.grad_from_embeddings:
            # frozen weights: the embedding output becomes a leaf that requires grad, so the captured
            # sites carry a graph (gradient localizers) without a gradient on any weight
            self._handles.append(an.embed().register_forward_hook(
                lambda m, a, o: o.detach().requires_grad_(True) if isinstance(o, torch.Tensor) else o))
        if not by_target:
            return
        # the mask is read at the top model and again at the module holding the layers, so a call
        # to the inner model alone (or a VLM's language model) never pools with a stale mask
        roots = [self.model, getattr(an, "root", None)]  # no LM anatomy: vision sites only
        for m in dict.fromkeys(roots) if (self.capture_sites or self.keep_passes) else ():
            if isinstance(m, torch.nn.Module):
                self._handles.append(m.register_forward_pre_hook(self._grab_mask, with_kwargs=True))
        if self.vision is not None and self.vision.spec.flat and any(s.kind in VISION_KINDS
                                                                     for s in self.capture_sites):
            self._handles.append(self.vision.tower().register_forward_pre_hook(self._grab_grid, with_kwargs=True))
        moe_layers = sorted({layer for (kind, layer) in by_target if kind in MOE_KINDS})
        for layer in moe_layers:  # the block's [B, T] shape, to unflatten router and expert tokens
            self._handles.append(an.mlp(layer).register_forward_pre_hook(
                lambda m, args, kwargs, l=layer: self._moe_bt.__setitem__(
                    l, (args[0] if args else next(iter(kwargs.values()))).shape[:-1]), with_kwargs=True))
            caps = by_target.get(("mlp.expert.hidden", layer), {"cap": []})["cap"] + \
                by_target.get(("mlp.expert.out", layer), {"cap": []})["cap"]
            edits = by_target.get(("mlp.expert.out", layer), {"edit": []})["edit"]
            if caps or edits:
                self._handles.append(an.experts(layer).register_forward_pre_hook(
                    self._make_expert_hook(layer, caps, edits), with_kwargs=True))
            if by_target.get(("mlp.router", layer), {"cap": []})["cap"]:
                self._handles.append(_post_hook(an.router(layer), self._make_router_hook(layer)))
        for (kind, layer), todo in by_target.items():
            site = Site(kind, layer)
            caps, edits = todo["cap"], todo["edit"]
            if kind in MOE_KINDS:
                continue  # registered above
            if kind == "mlp.out" and layer in an.moe_layers:  # the whole sparse block
                self._handles.append(_post_hook(an.mlp(layer), self._make_post_hook(site, caps, edits)))
            elif kind in ("attn.z", "mlp.hidden"):
                module = an.attn_out(layer) if kind == "attn.z" else an.mlp_down(layer)
                heads = an.n_heads if kind == "attn.z" else None
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(site, caps, edits, heads)))
            elif kind in ("resid", "mlp.out"):
                module = an.layer(layer) if kind == "resid" else an.mlp_down(layer)
                copy = kind == "mlp.out" and an.spec.mlp_out_added_in_place
                self._handles.append(_post_hook(module, self._make_post_hook(site, caps, edits, copy)))
            elif kind == "attn.pattern":
                if edits:
                    raise ExciseError("attn.L.pattern is read-only: edit attn.L.z to change what a head writes")
                attn = an.attn(layer)
                if "output_attentions" in inspect.signature(attn.forward).parameters:
                    # legacy attention modules (DeBERTa-v2) return weights only when asked
                    self._handles.append(attn.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._make_pattern_hook(site)))
            elif kind in VISION_KINDS:
                module = self.vision.layer(layer) if kind == "vision" else self.vision.projector()
                self._handles.append(_post_hook(module, self._make_post_hook(site, caps, edits)))

    def _make_router_hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            self._store(Site("mlp.router", layer), logits.view(*self._moe_bt[layer], logits.shape[-1]))

        return hook

    def _make_expert_hook(self, layer: int, caps: list[Site], edits: list[Edit]) -> Callable:
        """Pre-hook on the fused experts module: rescale routing weights (edits), recompute experts (captures)."""
        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            x, index, weights = bound.args[:3]  # experts(hidden_states, top_k_index, top_k_weights)
            for e in edits:
                weights = scale_expert(index, weights, parse_site(e.site).expert,
                                       0.0 if e.op == "zero" else float(e.value))
            bt = self._moe_bt[layer]
            done: dict[int, tuple] = {}  # an expert's hidden and out come from one recomputation
            for s in caps:
                if s.expert not in done:
                    done[s.expert] = expert_activations(module, x, index, weights, s.expert)
                hidden, out = done[s.expert]
                y = hidden if s.kind == "mlp.expert.hidden" else out
                self._store(s, y.view(*bt, y.shape[-1]))
            if not edits:
                return None
            return (x, index, weights), {}

        return hook

    def _grab_mask(self, module, args, kwargs):
        if self.keep_passes and module is self.model:
            self.passes.append({})
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            # attention_mask passed positionally: find it by the forward signature
            try:
                mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def _grab_grid(self, module, args, kwargs):
        # read at the tower, not the top model: transformers 5's generate() encodes images before its first call
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grid = grid if isinstance(grid, torch.Tensor) else None

    def _make_pre_hook(self, site: Site, caps, edits, heads: int | None) -> Callable:
        def hook(module, args):
            x = args[0]
            if heads is not None:
                x = x.view(*x.shape[:-1], heads, x.shape[-1] // heads)
            for e in edits:
                x = _apply_edit(x, e, site)
            if caps:
                self._store(site, x)
            if not edits and (self.detach or heads is None):
                return None
            if heads is not None:
                # also without edits when detach=False: the module must consume the captured
                # per-head view, or gradients would never reach it
                x = x.reshape(*x.shape[:-2], -1)
            return (x, *args[1:])

        return hook

    def _make_post_hook(self, site: Site, caps, edits, copy: bool = False) -> Callable:
        time_dim = 0 if site.kind in VISION_KINDS and self.vision.spec.flat else 1

        def hook(module, args, output):
            is_tuple = isinstance(output, tuple)
            x = output[0] if is_tuple else output
            for e in edits:
                x = _apply_edit(x, e, site, time_dim)
            if caps:
                # the model may add into x in place after this hook; pooled captures are copies already
                self._store(site, x.clone() if copy and self.detach and self.pool == "all" else x)
            if not edits:
                return None
            return (x, *output[1:]) if is_tuple else x

        return hook

    def _make_pattern_hook(self, site: Site) -> Callable:
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ExciseError(
                    f"{site.name}: the attention module returned no weights; load the model with "
                    "attn_implementation='eager'"
                )
            self._store(site, weights)

        return hook

    # --- context manager ------------------------------------------------------------------
    def attach(self) -> "Trace":
        """Register the hooks until :meth:`remove` (for edits that outlive a ``with`` block)."""
        if not self._handles:
            self._register()
        return self

    def __enter__(self) -> "Trace":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _check_moe_edit(e: Edit, site: Site) -> None:
    """Expert edits rescale routing weights: only scale / zero of an expert's output, everywhere."""
    if site.kind != "mlp.expert.out" or e.op not in ("scale", "zero"):
        raise ExciseError(f"edit '{e.op}' at {site.name}: mixture-of-experts sites are read-only except "
                          "mlp.L.expert.E.out, which takes 'scale' or 'zero' (a routing-weight rescale)")
    if e.heads is not None or e.positions is not None:
        raise ExciseError(f"edit at {site.name}: 'heads' and 'positions' do not apply to expert sites")
    if e.op == "scale" and torch.as_tensor(e.value).numel() != 1:
        raise ExciseError(f"edit 'scale' at {site.name}: the value must be one number (an expert's scale)")


def run_with_cache(handle: Any, texts_or_batch: Any, capture: str | Iterable[str], *, pool: Pool = "all",
                   edits: Iterable[Edit] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass with captures: returns (logits, CLIP's logits_per_image, or last hidden state; cache)."""
    batch = handle.encode(texts_or_batch) if isinstance(texts_or_batch, (list, tuple)) else texts_or_batch
    with torch.inference_mode(), Trace(handle, capture, edits, pool=pool) as tr:
        out = handle.model(**batch)
    logits = next(getattr(out, k) for k in ("logits", "logits_per_image", "last_hidden_state") if hasattr(out, k))
    return logits, tr.cache
