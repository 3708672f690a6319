"""Site vocabulary of :mod:`excise.trace`: names, parsing and expansion, edits and pooling.

Pure tensor functions with no hooks (those live in :mod:`excise.trace` only); the site table and
shapes are documented there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch

from excise.errors import ExciseError
from excise.models.anatomy.moe import expert_activations, scale_expert  # noqa: F401  (re-exported)

Pool = Literal["all", "last", "mean", "cls"]
POOLS = ("all", "last", "mean", "cls")
SITE_KINDS = ("resid", "attn.z", "attn.pattern", "mlp.hidden", "mlp.out", "vision", "projector.out",
              "mlp.router", "mlp.expert.hidden", "mlp.expert.out")
VISION_KINDS = ("vision", "projector.out")
MOE_KINDS = ("mlp.router", "mlp.expert.hidden", "mlp.expert.out")
_SITE_RE = re.compile(
    r"^(?:(resid|vision)\.(\d+)|attn\.(\d+)\.(z|pattern)|mlp\.(\d+)\.(hidden|out|router)|(projector\.out))$")
_EXPERT_RE = re.compile(r"^mlp\.(\d+)\.expert\.(\d+)\.(hidden|out)$")


@dataclass(frozen=True)
class Site:
    kind: str  # one of SITE_KINDS
    layer: int
    expert: int | None = None  # mlp.expert.* sites only

    @property
    def name(self) -> str:
        if self.expert is not None:
            return f"mlp.{self.layer}.expert.{self.expert}.{self.kind.rsplit('.', 1)[1]}"
        if self.kind in ("resid", "vision"):
            return f"{self.kind}.{self.layer}"
        if self.kind == "projector.out":
            return self.kind
        a, b = self.kind.split(".")
        return f"{a}.{self.layer}.{b}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str, n_layers: int | None = None, n_vision_layers: int | None = None,
               n_experts: int | None = None) -> Site:
    """``n_layers`` bounds the language model's layers, ``n_vision_layers`` the vision tower's, ``n_experts`` experts."""
    e = _EXPERT_RE.match(name)
    if e:
        site = Site(f"mlp.expert.{e.group(3)}", int(e.group(1)), int(e.group(2)))
        if n_layers is not None and not 0 <= site.layer < n_layers:
            raise ExciseError(f"site '{name}': layer {site.layer} out of range 0..{n_layers - 1}")
        if n_experts is not None and not 0 <= site.expert < n_experts:
            raise ExciseError(f"site '{name}': expert {site.expert} out of range 0..{n_experts - 1}"
                              if n_experts else f"site '{name}': the model has no mixture of experts")
        return site
    m = _SITE_RE.match(name)
    if not m:
        raise ExciseError(
            f"unknown site '{name}'; sites are resid.L, attn.L.z, attn.L.pattern, mlp.L.hidden, mlp.L.out, "
            "mlp.L.router, mlp.L.expert.E.hidden, mlp.L.expert.E.out, vision.L, projector.out "
            "(L a layer index, E an expert index, or * for all)"
        )
    if m.group(7):
        return Site("projector.out", 0)
    if m.group(1):
        site = Site(m.group(1), int(m.group(2)))
    elif m.group(3):
        site = Site(f"attn.{m.group(4)}", int(m.group(3)))
    else:
        site = Site(f"mlp.{m.group(6)}", int(m.group(5)))
    n = n_vision_layers if site.kind == "vision" else n_layers
    if n is not None and not 0 <= site.layer < n:
        raise ExciseError(f"site '{name}': layer {site.layer} out of range 0..{n - 1}")
    return site


def is_vision_site(name: str) -> bool:
    return name.startswith("vision.") or name == "projector.out"


def expand_sites(patterns: str | Iterable[str], n_layers: int, n_vision_layers: int | None = None, *,
                 moe_layers: Iterable[int] = (), n_experts: int | None = None) -> list[str]:
    """Expand ``*`` over layers (``vision.*`` over the vision tower's) and the shorthand ``all`` (LM sites).

    ``attn.*.z`` -> attn.0.z ... attn.{L-1}.z; ``mlp.*.expert.*.out`` also over ``n_experts``. In
    ``all`` a mixture-of-experts layer (``moe_layers``) has ``mlp.L.router`` instead of
    ``mlp.L.hidden`` (per-expert sites are asked for by name: there are many). Without
    ``n_vision_layers`` a named vision site is kept unchecked and ``vision.*`` is an error; whether
    the model has a vision tower is the Trace's check (its VisionAnatomy).
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    moe = set(moe_layers)
    out: list[str] = []
    for p in patterns:
        if p == "all":
            out += [s for l in range(n_layers) for s in
                    (f"resid.{l}", f"attn.{l}.z", f"attn.{l}.pattern",
                     f"mlp.{l}.router" if l in moe else f"mlp.{l}.hidden", f"mlp.{l}.out")]
        elif _EXPERT_RE.match(p.replace("*", "0")):
            _, lay, _, exp, kind = p.split(".")
            if exp == "*" and not n_experts:
                raise ExciseError(f"expanding '{p}' needs a mixture-of-experts model (n_experts)")
            layers = sorted(moe) if lay == "*" else [int(lay)]
            experts = range(n_experts or 0) if exp == "*" else [int(exp)]
            out += [f"mlp.{l}.expert.{e}.{kind}" for l in layers for e in experts]
        elif "*" in p:
            if is_vision_site(p) and n_vision_layers is None:
                raise ExciseError(f"expanding '{p}' needs the vision tower's number of layers (n_vision_layers)")
            out += [p.replace("*", str(l)) for l in range(n_vision_layers if is_vision_site(p) else n_layers)]
        else:
            out.append(p)
    for s in out:
        parse_site(s, n_layers, n_vision_layers, n_experts)
    return list(dict.fromkeys(out))


@dataclass
class Edit:
    """An edit applied at a site during the forward pass.

    ``op``: ``scale`` (multiply by ``value``: a float, or a per-head vector [H] at ``attn.L.z``),
    ``zero``, ``patch`` (replace with ``value``, e.g. another run's cache, broadcast to the site's
    shape), ``add`` (add ``value``, e.g. a steering vector), ``map`` (replace x by ``value(x)``, same
    shape: splice a sparse autoencoder's reconstruction, clamp latents; at ``attn.L.z`` it gets the
    [B, T, H, Dh] view). ``heads`` restricts an ``attn.L.z`` edit to some heads; ``positions``
    restricts it to some token (patch) positions.
    """

    site: str
    op: Literal["scale", "zero", "patch", "add", "map"]
    value: Any = None
    heads: Sequence[int] | None = None
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("scale", "zero", "patch", "add", "map"):
            raise ExciseError(f"unknown edit op '{self.op}'; choose scale, zero, patch, add or map")
        if self.op in ("scale", "patch", "add") and self.value is None:
            raise ExciseError(f"edit '{self.op}' at {self.site} needs a value")
        if self.op == "map" and not callable(self.value):
            raise ExciseError(f"edit 'map' at {self.site} needs a callable value (x -> x of the same shape)")


def _apply_edit(x: torch.Tensor, edit: Edit, site: Site, time_dim: int = 1) -> torch.Tensor:
    """Return x edited; ``x`` has shape [B, T, H, Dh] at attn.z and [B, T, F] elsewhere.

    ``time_dim`` is the position axis ``positions`` index: 0 for flat vision layouts ([N, F]).

    The edit is computed on the whole tensor and blended in with a boolean selection over
    positions (and heads), so it works with any broadcastable value and keeps autograd intact.
    """
    if site.kind == "attn.pattern":
        raise ExciseError("attn.L.pattern is read-only: edit attn.L.z to change what a head writes")
    if edit.heads is not None and site.kind != "attn.z":
        raise ExciseError(f"edit at {site.name}: 'heads' only applies to attn.L.z sites")
    if edit.op == "zero":
        new = torch.zeros_like(x)
    elif edit.op == "map":
        new = edit.value(x)
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ExciseError(f"edit 'map' at {site.name}: the callable returned {got}, "
                              f"expected shape {tuple(x.shape)}")
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
    if x.dim() < 2 + time_dim:
        raise ExciseError(f"edit at {site.name}: 'positions' needs a token axis; this site has shape {tuple(x.shape)}")
    T = x.shape[time_dim]
    sel = torch.zeros((T, x.shape[2]) if site.kind == "attn.z" else (T,), dtype=torch.bool, device=x.device)
    pos = list(range(T)) if edit.positions is None else [p for p in edit.positions if -T <= p < T]
    if edit.heads is None:
        sel[pos] = True
    else:
        for h in edit.heads:
            sel[pos, h] = True
    sel = sel.view(*([1] * time_dim), *sel.shape, *([1] * (x.dim() - time_dim - sel.dim())))
    return torch.where(sel, new, x)


def _pool(x: torch.Tensor, mask: torch.Tensor | None, pool: str, time_dim: int = 1) -> torch.Tensor:
    """Pool the token axis, reading real positions from the attention mask."""
    if pool == "all":
        return x
    if pool == "cls":
        return x.select(time_dim, 0)
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
    raise ExciseError(f"unknown pooling '{pool}'; choose all, last, mean or cls")


def _pool_vision(x: torch.Tensor, pool: str, lengths: list[int] | None) -> torch.Tensor:
    """Pool a vision capture over its patches: [B, P, d] -> [B, d]; flat [N, d] per image -> [n_images, d]."""
    if pool == "all" or x.dim() < 2 or (x.dim() == 2 and lengths is None):
        return x  # nothing to pool: CLIP's image embedding [B, d_proj], or a flat capture without grid
    if x.dim() == 2:
        if sum(lengths) != x.shape[0]:
            raise ExciseError(f"flat vision capture has {x.shape[0]} rows, the images' grid says {sum(lengths)}")
        return torch.stack([_pool(part.unsqueeze(0), None, pool)[0] for part in x.split(lengths)])
    return _pool(x, None, pool)
