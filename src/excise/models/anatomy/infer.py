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
from excise.models.anatomy.spec import _REGISTRY, AnatomySpec, _cfg

HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
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
    if _cfg(config, "is_encoder_decoder", default=False):
        raise _refuse(model_type, "cannot work: it is an encoder-decoder (is_encoder_decoder=true); excise "
                      "reads one stack of blocks")
    for what, keys in (("number of heads", HEAD_KEYS), ("hidden size", WIDTH_KEYS)):
        if _cfg(config, *keys) is None:
            raise _refuse(model_type, f"cannot work: the config has no {what} (none of {', '.join(keys)}); "
                          f"families with a spec: {', '.join(sorted(_REGISTRY))}")


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
    if len(cands) != 1:
        found = ", ".join(f"{n} [{i}->{o}]" for n, (i, o, _) in linears.items()) or "none"
        raise _refuse(mt, f"found {len(cands)} attention output projections in block '{layers_path}.0' (need one "
                      f"Linear named {'/'.join(ATTN_OUT_NAMES)} under an attention module with in_features "
                      f"n_heads*head_dim={want}, out_features {d_model}); its Linear modules: {found}")
    attn_out = cands[0]
    container = attn_out.split(".")[0]
    queries = [n for n in linears if n.startswith(container + ".") and n.split(".")[-1] in QUERY_NAMES]
    attn = queries[0].rsplit(".", 1)[0] if queries else attn_out.rsplit(".", 1)[0]
    d_ff = _cfg(config, *FFN_KEYS)
    downs = [n for n, (i, o, _) in linears.items() if not n.startswith(container + ".") and o == d_model
             and (i == d_ff if d_ff else (i != d_model and n.split(".")[-1] in DOWN_NAMES))]
    if len(downs) > 1:
        downs = [n for n in downs if n.split(".")[-1] in DOWN_NAMES]
    if len(downs) != 1:
        found = ", ".join(f"{n} [{i}->{o}]" for n, (i, o, _) in linears.items() if not n.startswith(container + "."))
        raise _refuse(mt, f"found {len(downs)} MLP down-projections in block '{layers_path}.0' (need one Linear "
                      f"outside '{container}' with in_features = intermediate size {d_ff or '(not in config)'} and "
                      f"out_features {d_model}); Linear modules outside attention: {found or 'none'}")
    mlp_down = downs[0]
    root_names = {id(m): n for n, m in root.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or id(emb) not in root_names:
        raise _refuse(mt, f"found no input embedding under {type(root).__name__} (get_input_embeddings)")
    norms = [n for n, m in root.named_children() if n in NORM_NAMES]
    return AnatomySpec(
        family=f"inferred:{mt}", model_types=(mt,), layers=layers_path, embed=root_names[id(emb)],
        final_norm=norms[0] if norms else None, attn=attn, attn_out=attn_out,
        mlp=mlp_down.rsplit(".", 1)[0] if "." in mlp_down else mlp_down, mlp_down=mlp_down,
        attn_out_transposed=linears[attn_out][2], mlp_down_transposed=linears[mlp_down][2],
        # a masked-LM family read as a decoder only when loaded as one (BertLMHeadModel)
        is_decoder=(mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        or "CausalLM" in type(model).__name__, inferred=True,
    )


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
    import torch.nn.functional as F

    model, spec = anat.model, anat.spec
    if _PROVEN.get(model) is spec:
        return spec
    mt = spec.model_types[0]
    batch = _probe_inputs(model)
    B, T = batch["input_ids"].shape
    L, h = anat.n_layers - 1, min(1, anat.n_heads - 1)
    o_proj, down, layer = anat.attn_out(L), anat.mlp_down(L), anat.layer(L)
    seen: dict[str, Any] = {}

    def run(*hooks) -> Any:
        handles = [fn(m, hk) for m, fn, hk in hooks]
        try:
            with torch.no_grad():
                return _out(model(**batch)).float()
        except Exception as e:  # noqa: BLE001  (any failure is a refusal, in one line)
            raise _refuse(mt, f"failed: the model did not run on a {B}x{T} probe batch "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        finally:
            for hd in handles:
                hd.remove()

    pre, post = torch.nn.Module.register_forward_pre_hook, torch.nn.Module.register_forward_hook

    def grab_o(m, args, out):
        seen.update(o_in=args[0].detach().clone(), o_out=(out[0] if isinstance(out, tuple) else out).detach().clone())

    def grab_down(m, args, out):
        seen.update(d_in=args[0].detach().clone(), d_out_raw=out, d_out=out.detach().clone())

    def grab_layer(m, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states")
        seen.update(r_in=x.detach().clone(), r_out=(out[0] if isinstance(out, tuple) else out).detach().clone())

    clean = run((o_proj, post, grab_o), (down, post, grab_down),
                (layer, lambda m, fn: m.register_forward_hook(fn, with_kwargs=True), grab_layer))
    if "o_in" not in seen or "d_in" not in seen:
        missing = "attention output projection" if "o_in" not in seen else "MLP down-projection"
        raise _refuse(mt, f"failed check (a)/(b): the inferred {missing} of layer {L} is never called as a module")
    for what, name, x, want in (("attention output projection", spec.attn_out, seen["o_in"], anat.n_heads * anat.head_dim),
                                ("MLP down-projection", spec.mlp_down, seen["d_in"], anat.d_mlp)):
        if tuple(x.shape) != (B, T, want):
            raise _refuse(mt, f"failed: the inferred {what} '{name}' receives {list(x.shape)}, not [B, T, F] = "
                          f"[{B}, {T}, {want}] (batch and time flattened into B*T?): its sites could not be pooled "
                          "per sequence; the family needs a spec")
    # (a) one head zeroed at the projection's input == its weight columns zeroed
    sl = slice(h * anat.head_dim, (h + 1) * anat.head_dim)

    def zero_head(m, args):
        x = args[0].clone()
        x[..., sl] = 0
        return (x, *args[1:])

    hooked = run((o_proj, pre, zero_head))
    w = o_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        (w[sl, :] if spec.attn_out_transposed else w[:, sl]).zero_()
    try:
        baked = run()
    finally:
        with torch.no_grad():
            w.copy_(saved)
    scale = clean.abs().max().clamp(min=1.0)
    if (hooked - clean).abs().max() <= 1e-6 * scale:
        raise _refuse(mt, f"failed check (a): zeroing head {h} at '{spec.attn_out}' (layer {L}) did not change the "
                      "output: the inferred projection is not on the model's path")
    if (hooked - baked).abs().max() > 1e-4 * scale:
        raise _refuse(mt, f"failed check (a): zeroing head {h} at the input of '{spec.attn_out}' differs from zeroing "
                      f"its weight columns by {float((hooked - baked).abs().max()):.2e}")
    # (b) mlp.out is the down-projection of mlp.hidden, and on the path
    bias = getattr(down, "bias", None)
    with torch.no_grad():
        redo = (seen["d_in"] @ down.weight + (0 if bias is None else bias) if spec.mlp_down_transposed
                else F.linear(seen["d_in"], down.weight, bias))
    if tuple(seen["d_out"].shape) != (B, T, anat.d_model) or not torch.allclose(redo, seen["d_out"], atol=1e-5, rtol=1e-4):
        raise _refuse(mt, f"failed check (b): the output of '{spec.mlp_down}' is not its weight applied to its input "
                      f"(shape {list(seen['d_out'].shape)})")
    in_place = not torch.equal(seen["d_out_raw"].detach(), seen["d_out"])
    zeroed = run((down, post, lambda m, a, o: torch.zeros_like(o)))
    if (zeroed - clean).abs().max() <= 1e-6 * scale:
        raise _refuse(mt, f"failed check (b): zeroing the output of '{spec.mlp_down}' (layer {L}) did not change the "
                      "output: the inferred MLP is not on the model's path")
    if tuple(seen["r_out"].shape) != (B, T, anat.d_model):
        raise _refuse(mt, f"failed: block '{spec.layers}.{L}' returns {list(seen['r_out'].shape)}, not [B, T, d_model]")
    resid = torch.allclose(seen["r_out"] - seen["r_in"], seen["o_out"] + seen["d_out"], atol=1e-4, rtol=1e-3)
    notes = ("residual block: resid_out - resid_in == attn_out + mlp_out (checked)" if resid else
             "layout not a plain residual sum (post-norm, scaled or gated): mlp.out checked by recomputation only")
    proven = dataclasses.replace(spec, mlp_out_added_in_place=in_place, notes=notes)
    _PROVEN[model] = proven
    return proven
