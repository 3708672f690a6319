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
``mlp.{l}.out``     output of the MLP down-projection                       [B, T, d_model]
==================  =====================================================  ==================

Pooling (padding-aware, from the attention mask of the forward call): ``all`` keeps every
position; ``last`` takes the last real token; ``mean`` averages real tokens. For patterns,
pooling applies to the query axis. A Trace never converts or wraps the model: with nothing to
capture or edit, no hook is registered and logits are bit-identical to plain ``transformers``.
Streaming a whole dataset to disk is :mod:`excise.trace_store`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy

Pool = Literal["all", "last", "mean"]
POOLS = ("all", "last", "mean")
SITE_KINDS = ("resid", "attn.z", "attn.pattern", "mlp.hidden", "mlp.out")
_SITE_RE = re.compile(r"^(?:(resid)\.(\d+)|attn\.(\d+)\.(z|pattern)|mlp\.(\d+)\.(hidden|out))$")


@dataclass(frozen=True)
class Site:
    kind: str  # one of SITE_KINDS
    layer: int

    @property
    def name(self) -> str:
        if self.kind == "resid":
            return f"resid.{self.layer}"
        a, b = self.kind.split(".")
        return f"{a}.{self.layer}.{b}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str, n_layers: int | None = None) -> Site:
    m = _SITE_RE.match(name)
    if not m:
        raise ExciseError(
            f"unknown site '{name}'; sites are resid.L, attn.L.z, attn.L.pattern, mlp.L.hidden, mlp.L.out "
            "(L a layer index, or * for all layers)"
        )
    if m.group(1):
        site = Site("resid", int(m.group(2)))
    elif m.group(3):
        site = Site(f"attn.{m.group(4)}", int(m.group(3)))
    else:
        site = Site(f"mlp.{m.group(6)}", int(m.group(5)))
    if n_layers is not None and not 0 <= site.layer < n_layers:
        raise ExciseError(f"site '{name}': layer {site.layer} out of range 0..{n_layers - 1}")
    return site


def expand_sites(patterns: str | Iterable[str], n_layers: int) -> list[str]:
    """Expand ``*`` over layers and the shorthand ``all``: ``attn.*.z`` -> attn.0.z ... attn.{L-1}.z."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    out: list[str] = []
    for p in patterns:
        if p == "all":
            out += [s for l in range(n_layers) for s in
                    (f"resid.{l}", f"attn.{l}.z", f"attn.{l}.pattern", f"mlp.{l}.hidden", f"mlp.{l}.out")]
        elif "*" in p:
            out += [p.replace("*", str(l)) for l in range(n_layers)]
        else:
            out.append(p)
    for s in out:
        parse_site(s, n_layers)
    return list(dict.fromkeys(out))


@dataclass
class Edit:
    """An edit applied at a site during the forward pass.

    ``op``: ``scale`` (multiply by ``value``: a float, or a per-head vector [H] at ``attn.L.z``),
    ``zero``, ``patch`` (replace with ``value``, e.g. another run's cache, broadcast to the site's
    shape), ``add`` (add ``value``, e.g. a steering vector). ``heads`` restricts an ``attn.L.z``
    edit to some heads; ``positions`` restricts it to some token positions.
    """

    site: str
    op: Literal["scale", "zero", "patch", "add"]
    value: Any = None
    heads: Sequence[int] | None = None
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("scale", "zero", "patch", "add"):
            raise ExciseError(f"unknown edit op '{self.op}'; choose scale, zero, patch or add")
        if self.op in ("scale", "patch", "add") and self.value is None:
            raise ExciseError(f"edit '{self.op}' at {self.site} needs a value")


def _apply_edit(x: torch.Tensor, edit: Edit, site: Site) -> torch.Tensor:
    """Return x edited; ``x`` has shape [B, T, H, Dh] at attn.z and [B, T, F] elsewhere.

    The edit is computed on the whole tensor and blended in with a boolean selection over
    positions (and heads), so it works with any broadcastable value and keeps autograd intact.
    """
    if site.kind == "attn.pattern":
        raise ExciseError("attn.L.pattern is read-only: edit attn.L.z to change what a head writes")
    if edit.heads is not None and site.kind != "attn.z":
        raise ExciseError(f"edit at {site.name}: 'heads' only applies to attn.L.z sites")
    if edit.op == "zero":
        new = torch.zeros_like(x)
    else:
        v = torch.as_tensor(edit.value, dtype=x.dtype, device=x.device)
        if site.kind == "attn.z" and v.dim() == 1 and v.numel() == x.shape[-2] and edit.op == "scale":
            v = v.view(-1, 1)  # per-head scale against [..., H, Dh]
        try:
            if edit.op == "scale":
                new = x * v
            elif edit.op == "add":
                new = x + v
            else:
                new = v.expand_as(x)
            if new.shape != x.shape:
                raise RuntimeError("shape")
        except RuntimeError:
            raise ExciseError(
                f"edit '{edit.op}' at {site.name}: value of shape {tuple(v.shape)} does not broadcast to the site's "
                f"shape {tuple(x.shape)} (patch with a pool='all' capture of the same batch shape)"
            ) from None
    if edit.positions is None and edit.heads is None:
        return new
    T = x.shape[1]
    sel = torch.zeros((T, x.shape[2]) if site.kind == "attn.z" else (T,), dtype=torch.bool, device=x.device)
    pos = list(range(T)) if edit.positions is None else [p for p in edit.positions if -T <= p < T]
    if edit.heads is None:
        sel[pos] = True
    else:
        for h in edit.heads:
            sel[pos, h] = True
    sel = sel.view(1, *sel.shape, *([1] * (x.dim() - 1 - sel.dim())))
    return torch.where(sel, new, x)


def _pool(x: torch.Tensor, mask: torch.Tensor | None, pool: str, time_dim: int = 1) -> torch.Tensor:
    """Pool the token axis, reading real positions from the attention mask."""
    if pool == "all":
        return x
    T = x.shape[time_dim]
    if mask is None or mask.shape[-1] != T:
        mask = torch.ones(x.shape[0], T, dtype=torch.long, device=x.device)
    mask = mask.to(x.device)
    if pool == "last":
        # index of the last real token works for left and right padding alike
        last = (T - 1) - mask.flip(-1).long().argmax(-1)
        index = last.view(-1, *([1] * (x.dim() - 1)))
        # every non-time axis keeps its full size (heads of a pattern included)
        index = index.expand(*x.shape[:time_dim], 1, *x.shape[time_dim + 1:])
        return x.gather(time_dim, index).squeeze(time_dim)
    if pool == "mean":
        m = mask.to(x.dtype).view(x.shape[0], *([1] * (time_dim - 1)), T, *([1] * (x.dim() - time_dim - 1)))
        return (x * m).sum(time_dim) / m.sum(time_dim).clamp(min=1)
    raise ExciseError(f"unknown pooling '{pool}'; choose all, last or mean")


def _ask_for_weights(module, args, kwargs):
    """Forward pre-hook: call an attention module with ``output_attentions=True``."""
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    if bound.arguments.get("output_attentions"):
        return None
    bound.arguments["output_attentions"] = True
    return bound.args, bound.kwargs


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
        self.model = handle.model if hasattr(handle, "anatomy") else handle
        self.anatomy = handle.anatomy if hasattr(handle, "anatomy") and handle.anatomy is not None else Anatomy.of(self.model)
        if pool not in POOLS:
            raise ExciseError(f"unknown pooling '{pool}'; choose all, last or mean")
        n = self.anatomy.n_layers
        self.capture_sites = [parse_site(s, n) for s in expand_sites(capture, n)] if capture else []
        # an edit at ``attn.*.z`` applies at every layer; the caller's Edit objects are not mutated
        self.edits = [dataclasses.replace(e, site=s) for e in edits for s in expand_sites([e.site], n)]
        for e in self.edits:  # fail before the forward pass, not inside a hook
            site = parse_site(e.site)
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
        if any(s.kind == "attn.pattern" for s in self.capture_sites):
            impl = getattr(self.model.config, "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ExciseError(
                    f"capturing attn.L.pattern needs eager attention, the model uses '{impl}'; "
                    "load it with attn_implementation='eager'"
                )

    # --- hooks -------------------------------------------------------------------------
    def _store(self, site: Site, x: torch.Tensor) -> None:
        if site.kind == "attn.pattern":
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
        for m in dict.fromkeys([self.model, an.root]) if (self.capture_sites or self.keep_passes) else ():
            if isinstance(m, torch.nn.Module):
                self._handles.append(m.register_forward_pre_hook(self._grab_mask, with_kwargs=True))
        for (kind, layer), todo in by_target.items():
            site = Site(kind, layer)
            caps, edits = todo["cap"], todo["edit"]
            if kind in ("attn.z", "mlp.hidden"):
                module = an.attn_out(layer) if kind == "attn.z" else an.mlp_down(layer)
                heads = an.n_heads if kind == "attn.z" else None
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(site, caps, edits, heads)))
            elif kind in ("resid", "mlp.out"):
                module = an.layer(layer) if kind == "resid" else an.mlp_down(layer)
                copy = kind == "mlp.out" and an.spec.mlp_out_added_in_place
                self._handles.append(module.register_forward_hook(self._make_post_hook(site, caps, edits, copy)))
            elif kind == "attn.pattern":
                if edits:
                    raise ExciseError("attn.L.pattern is read-only: edit attn.L.z to change what a head writes")
                attn = an.attn(layer)
                if "output_attentions" in inspect.signature(attn.forward).parameters:
                    # legacy attention modules (DeBERTa-v2) return weights only when asked
                    self._handles.append(attn.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._make_pattern_hook(site)))

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
        def hook(module, args, output):
            is_tuple = isinstance(output, tuple)
            x = output[0] if is_tuple else output
            for e in edits:
                x = _apply_edit(x, e, site)
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


def run_with_cache(handle: Any, texts_or_batch: Any, capture: str | Iterable[str], *, pool: Pool = "all",
                   edits: Iterable[Edit] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass with captures: returns (logits or last hidden state, cache)."""
    batch = handle.encode(texts_or_batch) if isinstance(texts_or_batch, (list, tuple)) else texts_or_batch
    with torch.inference_mode(), Trace(handle, capture, edits, pool=pool) as tr:
        out = handle.model(**batch)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return logits, tr.cache
