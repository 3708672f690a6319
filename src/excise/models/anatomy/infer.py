"""Anatomy inference: a spec read from the module tree and config of a family excise has no spec for,
proven on the loaded model before use.

Why inference is safe to use only once proven: names and sizes can match by accident (a q
projection is d_model -> d_model too), and a module can be bypassed (BLOOM's ``slow_but_exact``
applies ``dense`` by weight slices) or see flattened tokens (OPT's MLP). So :func:`infer_spec`
proposes, and :func:`prove` runs the model on a 2x4 probe batch and checks what excise relies on:

(a) zeroing one head's slice at the inferred attention-output input (a hook) changes the output,
    and equals zeroing that head's input columns of the projection's weight (a bake);
(b) the down-projection sees ``[B, T, F]`` and returns ``[B, T, d]`` (no flattened batch), its
    output is exactly its weight applied to its input (so ``mlp.L.out`` is what ``mlp.L.hidden``
    writes), and zeroing it changes the output; whether the block then adds into it in place is
    measured (``mlp_out_added_in_place``), and for residual blocks ``resid_out - resid_in ==
    attn_out + mlp_out`` is recorded in the spec's notes.

The probes register temporary forward hooks here (not in :mod:`excise.trace`, a layer above).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

from excise.errors import ExciseError
from excise.models.anatomy.moe import expert_activations, scale_expert
from excise.models.anatomy.spec import _REGISTRY, AnatomySpec, _cfg

HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "hidden_dim", "ffn_hidden_size")
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "Wo", "out_lin", "o", "proj", "out")
QUERY_NAMES = ("q_proj", "query", "query_proj", "q", "c_attn", "query_key_value", "Wqkv", "qkv_proj", "q_lin", "qkv", "Wq",
               "in_proj")
DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "dense", "w2", "wo", "Wo", "fc_out", "lin2",
              "out_proj")
NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm", "ln_final")
_PROVEN: "weakref.WeakKeyDictionary[Any, AnatomySpec]" = weakref.WeakKeyDictionary()


def _refuse(model_type: str, why: str) -> ExciseError:
    return ExciseError(f"unsupported architecture family '{model_type}': no anatomy spec, and inference {why}")


def check_family(model_type: str, config: Any) -> None:
    """Refuse early (before weights) only when inference cannot work from the config alone."""
    if model_type in _REGISTRY:
        return
    if varying := _per_layer_sizes(config):
        raise _refuse(model_type, f"cannot work: its config sets {', '.join(varying)} per layer (per_layer_config); "
                      "excise needs the same heads and sizes in every layer")
    if _cfg(config, "is_encoder_decoder", default=False):
        raise _refuse(model_type, "cannot work: it is an encoder-decoder (is_encoder_decoder=true); excise "
                      "reads one stack of blocks")
    for what, keys in (("number of heads", HEAD_KEYS), ("hidden size", WIDTH_KEYS)):
        # a raw config.json names sizes as the family does (a config object also maps the common names)
        if _cfg(config, *keys) is None and not (isinstance(config, dict) and what == "number of heads" and any(
                k.endswith("heads") and isinstance(v, int) for k, v in config.items())):
            raise _refuse(model_type, f"cannot work: the config has no {what} (none of {', '.join(keys)}); "
                          f"families with a spec: {', '.join(sorted(_REGISTRY))}")


def _per_layer_sizes(config: Any) -> list[str]:
    """Head counts and widths a heterogeneous config (transformers' per_layer_config) sets per layer."""
    if isinstance(config, dict):
        per = config.get("per_layer_config")
        keys = {k for o in per.values() if isinstance(o, dict) for k in o} if isinstance(per, dict) else set()
    else:
        spec = getattr(config, "__dict__", {}).get("_heterogeneity_spec")
        keys = set(getattr(spec, "per_layer_attributes", None) or ())
    return sorted(keys & {*HEAD_KEYS, *WIDTH_KEYS, *FFN_KEYS, "head_dim", "num_key_value_heads"})


def _linear_io(m: Any) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of a Linear or GPT-2 style Conv1D; None otherwise."""
    w = getattr(m, "weight", None)
    if w is None or getattr(w, "dim", lambda: 0)() != 2 or list(m.children()):
        return None
    if type(m).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1]), True
    if type(m).__name__.endswith("Linear") or hasattr(m, "in_features"):
        return int(w.shape[1]), int(w.shape[0]), False
    return None


def _base(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    return getattr(model, "base_model", model)


def infer_spec(model: Any, config: Any) -> AnatomySpec:
    """Propose a spec from the module tree and config (refuses naming what was found and what is missing)."""
    import torch.nn as nn
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    mt = getattr(config, "model_type", None) or "unknown"
    if _PROVEN.get(model) is not None:
        return _PROVEN[model]
    check_family(mt, config)
    n_heads, d_model = int(_cfg(config, *HEAD_KEYS)), int(_cfg(config, *WIDTH_KEYS))
    head_dim = int(_cfg(config, "head_dim", default=d_model // n_heads))
    root = _base(model)
    lists = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(b) for b in m}) == 1]
    if not lists:
        raise _refuse(mt, f"found no ModuleList of identical blocks under {type(root).__name__}")
    layers_path, layers = max(lists, key=lambda nm: (len(nm[1]), -nm[0].count(".")))
    linears = {n: io for n, m in layers[0].named_modules() if n and (io := _linear_io(m))}
    want = n_heads * head_dim
    cands = [n for n, (i, o, _) in linears.items() if n.split(".")[-1] in ATTN_OUT_NAMES and i == want and o == d_model
             and any(k in p.lower() for p in n.split(".")[:-1] for k in ("att", "mixer"))]
    if len(cands) > 1:  # a decoder layer with cross-attention: the self-attention's projection
        cands = [n for n in cands if "self" in n.lower()] or cands
    if len(cands) != 1:
        found = ", ".join(f"{n} [{i}->{o}]" for n, (i, o, _) in linears.items()) or "none"
        raise _refuse(mt, f"found {len(cands)} attention output projections in block '{layers_path}.0' (need one "
                      f"Linear named {'/'.join(ATTN_OUT_NAMES)} under an attention module with in_features "
                      f"n_heads*head_dim={want}, out_features {d_model}); its Linear modules: {found}")
    attn_out = cands[0]
    container = attn_out.split(".")[0]
    queries = [n for n in linears if n.startswith(container + ".") and n.split(".")[-1] in QUERY_NAMES]
    attn = queries[0].rsplit(".", 1)[0] if queries else attn_out.rsplit(".", 1)[0]
    moe = _find_moe(mt, layers, d_model)
    dense = next((l for l, layer in enumerate(layers) if not moe or not _has_path(layer, moe[1])), None)
    if dense is None:  # every layer is sparse: mlp_down is never resolved
        mlp_down, down_io = f"{moe[0]}.down_proj", (0, 0, False)
    else:
        mlp_down = _find_down(mt, layers_path, dense, layers[dense], container, d_model, _cfg(config, *FFN_KEYS))
        down_io = _linear_io(_module(layers[dense], mlp_down))
        if not moe and any("expert" in part for part in mlp_down.split(".")):
            raise _refuse(mt, f"found the down-projection '{mlp_down}' inside an expert: the layer is a mixture of "
                          "experts without fused gate_up_proj/down_proj [E, ...] weights excise can read")
    for l, layer in enumerate(layers):  # hybrid stacks (linear-attention or SSM layers) differ from layer 0
        need = [attn_out] + ([moe[1]] if moe and _has_path(layer, moe[1]) else [mlp_down] if dense is not None else [])
        for path in need:
            if not _has_path(layer, path):
                raise _refuse(mt, f"found '{path}' in block '{layers_path}.0' but not in block '{layers_path}.{l}' "
                              f"({type(layer).__name__}): the layers differ (hybrid attention?)")
    root_names = {id(m): n for n, m in root.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or id(emb) not in root_names:
        raise _refuse(mt, f"found no input embedding under {type(root).__name__} (get_input_embeddings)")
    norms = [n for n, m in root.named_children() if n in NORM_NAMES]
    return AnatomySpec(
        family=f"inferred:{mt}", model_types=(mt,), layers=layers_path, embed=root_names[id(emb)],
        final_norm=norms[0] if norms else None, attn=attn, attn_out=attn_out,
        mlp=moe[0] if moe else (mlp_down.rsplit(".", 1)[0] if "." in mlp_down else mlp_down), mlp_down=mlp_down,
        attn_out_transposed=linears[attn_out][2], mlp_down_transposed=down_io[2],
        moe_router=moe[2] if moe else None, moe_experts=moe[1] if moe else None,
        # a masked-LM family read as a decoder only when loaded as one (BertLMHeadModel)
        is_decoder=(mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        or "CausalLM" in type(model).__name__, inferred=True,
    )


def _module(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _has_path(root: Any, path: str) -> bool:
    try:
        _module(root, path)
        return True
    except AttributeError:
        return False


def _find_down(mt: str, layers_path: str, l: int, layer: Any, container: str, d_model: int, d_ff: Any) -> str:
    """The dense MLP's down-projection in ``layer``: out d_model, in the intermediate size (or a known name)."""
    linears = {n: io for n, m in layer.named_modules() if n and (io := _linear_io(m))}
    outside = {n: io for n, io in linears.items() if not n.startswith(container + ".")}
    downs = [n for n, (i, o, _) in outside.items() if o == d_model
             and (i == d_ff if d_ff else (i != d_model and n.split(".")[-1] in DOWN_NAMES))]
    if len(downs) > 1:
        downs = [n for n in downs if n.split(".")[-1] in DOWN_NAMES]
    if len(downs) != 1:
        found = ", ".join(f"{n} [{i}->{o}]" for n, (i, o, _) in outside.items())
        raise _refuse(mt, f"found {len(downs)} MLP down-projections in block '{layers_path}.{l}' (need one Linear "
                      f"outside '{container}' with in_features = intermediate size {d_ff or '(not in config)'} and "
                      f"out_features {d_model}); Linear modules outside attention: {found or 'none'}")
    return downs[0]


def _find_moe(mt: str, layers: Any, d_model: int) -> tuple[str, str, str] | None:
    """(block, experts, router) paths of the first sparse layer: fused [E, ...] expert weights and a router
    (a child of the same block with weight [E, d_model]); None for a dense model."""
    for layer in layers:
        for n, m in layer.named_modules():
            p = dict(m.named_parameters(recurse=False))
            up = p.get("gate_up_proj", p.get("up_proj"))
            if "." not in n or "down_proj" not in p or p["down_proj"].dim() != 3 or up is None or up.dim() != 3:
                continue
            block, E = n.rsplit(".", 1)[0], p["down_proj"].shape[0]
            routers = [f"{block}.{c}" for c, sub in _module(layer, block).named_children()
                       if getattr(sub, "weight", None) is not None and tuple(sub.weight.shape) == (E, d_model)]
            if len(routers) != 1:
                raise _refuse(mt, f"found fused experts '{n}' ({E} experts) but {len(routers)} routers (a child of "
                              f"'{block}' with weight [{E}, {d_model}])")
            return block, n, routers[0]
    return None


def _probe_inputs(model: Any) -> dict:
    import torch

    vocab = int(_cfg(_cfg_of(model), "vocab_size", default=64))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(vocab, 100)), (2, 4), generator=g)
    dev = next(model.parameters()).device
    return {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}


def _cfg_of(model: Any) -> Any:
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _out(o: Any) -> Any:
    for k in ("logits", "last_hidden_state"):
        if getattr(o, k, None) is not None:
            return getattr(o, k)
    return o[0]


def prove(anat: Any) -> AnatomySpec:
    """Run the checks of the module docstring on ``anat``'s model; return the proven spec (cached per model)."""
    import torch

    model, spec = anat.model, anat.spec
    if _PROVEN.get(model) is spec:
        return spec
    mt = spec.model_types[0]
    batch = _probe_inputs(model)
    B, T = batch["input_ids"].shape
    dense = [l for l in range(anat.n_layers) if l not in anat.moe_layers]
    L = dense[-1] if dense else anat.n_layers - 1
    seen: dict[str, Any] = {}

    def run(*hooks) -> Any:
        handles = [fn(m, hk) for m, fn, hk in hooks]
        try:
            with torch.no_grad():
                return _out(model(**batch)).float()
        except ExciseError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure is a refusal, in one line)
            raise _refuse(mt, f"failed: the model did not run on a {B}x{T} probe batch "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        finally:
            for hd in handles:
                hd.remove()

    def tensor(x: Any, what: str) -> Any:
        x = x[0] if isinstance(x, tuple) else x
        if not isinstance(x, torch.Tensor):
            raise _refuse(mt, f"failed: {what} returns a {type(x).__name__}, not a tensor or a tuple starting with one")
        return x

    def grab(key: str, what: str):
        def hook(m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if "block" not in what and not isinstance(out, torch.Tensor):
                raise _refuse(mt, f"failed: the inferred {what} returns a {type(out).__name__}, not a tensor")
            seen[key] = (x.detach().clone(), tensor(out, what), tensor(out, what).detach().clone())
        return hook

    hooks = [(anat.attn_out(L), "attention output projection"), (anat.layer(L), f"block '{spec.layers}.{L}'")]
    hooks += [(anat.mlp_down(L), "MLP down-projection")] if dense else []
    clean = run(*[(m, lambda m, fn: m.register_forward_hook(fn, with_kwargs=True), grab(what, what)) for m, what in hooks])
    for _, what in hooks:
        if what not in seen:
            raise _refuse(mt, f"failed: the inferred {what} of layer {L} is never called as a module")
    o_in, _, o_out = seen["attention output projection"]
    r_in, _, r_out = seen[f"block '{spec.layers}.{L}'"]
    shapes = [("attention output projection", spec.attn_out, o_in, anat.n_heads * anat.head_dim)]
    shapes += [("MLP down-projection", spec.mlp_down, seen["MLP down-projection"][0], anat.d_mlp)] if dense else []
    for what, name, x, want in shapes:
        if tuple(x.shape) != (B, T, want):
            raise _refuse(mt, f"failed: the inferred {what} '{name}' receives {list(x.shape)}, not [B, T, F] = "
                          f"[{B}, {T}, {want}] (batch and time flattened into B*T?): its sites could not be pooled "
                          "per sequence; the family needs a spec")
    if tuple(r_out.shape) != (B, T, anat.d_model):
        raise _refuse(mt, f"failed: block '{spec.layers}.{L}' returns {list(r_out.shape)}, not [B, T, d_model]")
    scale = clean.abs().max().clamp(min=1.0)

    def same_as_bake(what: str, hooked: Any, *zero: tuple[Any, Any]) -> None:
        """``hooked`` changed the output, and equals the output with each ``param[index]`` of ``zero`` zeroed."""
        zero = tuple((p, i) for p, i in zero if p is not None)
        saved = [p.detach().clone() for p, _ in zero]
        with torch.no_grad():
            for p, i in zero:
                p[i] = 0
        try:
            baked = run()
        finally:
            with torch.no_grad():
                for (p, _), old in zip(zero, saved):
                    p.copy_(old)
        if (hooked - clean).abs().max() <= 1e-6 * scale:
            raise _refuse(mt, f"failed check: {what} did not change the output: not on the model's path")
        if (hooked - baked).abs().max() > 1e-4 * scale:
            raise _refuse(mt, f"failed check: {what} by a hook differs from zeroing its weights by "
                          f"{float((hooked - baked).abs().max()):.2e}")

    # (a) one head zeroed at the projection's input == its weight columns zeroed
    h = min(1, anat.n_heads - 1)
    sl = slice(h * anat.head_dim, (h + 1) * anat.head_dim)

    def zero_head(m, args):
        x = args[0].clone()
        x[..., sl] = 0
        return (x, *args[1:])

    o_proj = anat.attn_out(L)
    hooked = run((o_proj, torch.nn.Module.register_forward_pre_hook, zero_head))
    same_as_bake(f"(a) zeroing head {h} at '{spec.attn_out}' (layer {L})", hooked,
                 (o_proj.weight, (sl, slice(None)) if spec.attn_out_transposed else (slice(None), sl)))
    in_place, notes = False, "every layer is a mixture of experts"
    if dense:  # (b) mlp.out is the down-projection of mlp.hidden, and on the path
        down = anat.mlp_down(L)
        d_in, d_raw, d_out = seen["MLP down-projection"]
        redo = _linear(down, d_in, spec.mlp_down_transposed)
        if tuple(d_out.shape) != (B, T, anat.d_model) or not torch.allclose(redo, d_out, atol=1e-5, rtol=1e-4):
            raise _refuse(mt, f"failed check (b): the output of '{spec.mlp_down}' is not its weight applied to its "
                          f"input (shape {list(d_out.shape)})")
        in_place = not torch.equal(d_raw.detach(), d_out)
        zeroed = run((down, torch.nn.Module.register_forward_hook, lambda m, a, o: torch.zeros_like(o)))
        same_as_bake(f"(b) zeroing '{spec.mlp_down}' (layer {L})", zeroed, (down.weight, slice(None)),
                     (getattr(down, "bias", None), slice(None)))
        resid = torch.allclose(r_out - r_in, o_out + d_out, atol=1e-4, rtol=1e-3)
        notes = ("residual block: resid_out - resid_in == attn_out + mlp_out (checked)" if resid else
                 "layout not a plain residual sum (post-norm, scaled or gated): mlp.out checked by recomputation only")
    if anat.moe_layers:
        _prove_moe(anat, mt, run, same_as_bake, B * T)
    proven = dataclasses.replace(spec, mlp_out_added_in_place=in_place, notes=notes)
    _PROVEN[model] = proven
    return proven


def _linear(m: Any, x: Any, transposed: bool) -> Any:
    import torch
    import torch.nn.functional as F

    bias = getattr(m, "bias", None)
    with torch.no_grad():
        return x @ m.weight + (0 if bias is None else bias) if transposed else F.linear(x, m.weight, bias)


def _prove_moe(anat: Any, mt: str, run: Any, same_as_bake: Any, n_tokens: int) -> None:
    """(c) the router returns [B*T, E] logits, the recomputed experts sum to the experts module's output,
    and scaling one expert's routing weights to 0 equals zeroing its down-projection."""
    import inspect

    import torch

    L = anat.moe_layers[-1]
    experts, router = anat.experts(L), anat.router(L)
    seen: dict[str, Any] = {}

    def grab_in(m, args, kwargs):
        seen["args"] = inspect.signature(m.forward).bind(*args, **kwargs).args[:3]

    run((experts, lambda m, fn: m.register_forward_pre_hook(fn, with_kwargs=True), grab_in),
        (experts, torch.nn.Module.register_forward_hook, lambda m, a, o: seen.update(out=o)),
        (router, torch.nn.Module.register_forward_hook, lambda m, a, o: seen.update(logits=o)))
    logits = seen.get("logits")
    if not isinstance(logits, tuple) or tuple(logits[0].shape) != (n_tokens, anat.n_experts) or len(seen["args"]) < 3:
        raise _refuse(mt, f"failed check (c): router '{anat.spec.moe_router}' does not return (logits [{n_tokens}, "
                      f"{anat.n_experts}], weights, index) or experts are not called as experts(x, index, weights)")
    x, index, weights = seen["args"]
    try:
        total = sum(expert_activations(experts, x, index, weights, e)[1] for e in range(anat.n_experts))
    except ExciseError as e:
        raise _refuse(mt, f"failed check (c): {e}") from None
    if not torch.allclose(total, seen["out"], atol=1e-4, rtol=1e-3):
        raise _refuse(mt, f"failed check (c): the experts recomputed from '{anat.spec.moe_experts}' weights do not sum "
                      f"to its output (max diff {float((total - seen['out']).abs().max()):.2e})")

    e = int(index.flatten().mode().values)  # the expert the probe routes to most

    def drop(m, args, kwargs):
        x, index, weights = inspect.signature(m.forward).bind(*args, **kwargs).args[:3]
        return (x, index, scale_expert(index, weights, e, 0.0)), {}

    hooked = run((experts, lambda m, fn: m.register_forward_pre_hook(fn, with_kwargs=True), drop))
    same_as_bake(f"(c) dropping expert {e} of layer {L}", hooked, (experts.down_proj, e),
                 (getattr(experts, "down_proj_bias", None) if getattr(experts, "has_bias", False) else None, e))
