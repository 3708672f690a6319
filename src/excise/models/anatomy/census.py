"""Census of the text families transformers knows: which excise supports by a spec, by inference, or refuses.

Every model type of transformers' causal-LM and masked-LM auto mappings gets a tiny random model
built from its default config, shrunk (:func:`tiny_default_config`: sizes set by attribute name in
the config and in every nested sub-config, per-layer lists derived again for two layers, and a few
commented per-family values where transformers' own default cannot build a model); :meth:`Anatomy.of`
then binds a spec, infers and proves one, or refuses with its one-line reason. Families that still
cannot be built (a missing optional library) are listed as not built (with the error), never as supported.
``python -m excise.models.anatomy.census`` prints the markdown; ``tests/test_anatomy_matrix.py``
(slow) regenerates it and fails if docs/core.md differs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from typing import Any

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy, _text_config, check_family

MAX_PARAMS = 30_000_000
_SMALL = {  # config attribute -> tiny value, set only where the family's default config has it
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embedding_size", "word_embed_proj_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_blocks"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads"), 4),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "hidden_dim", "ffn_hidden_size"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), 32),
    **dict.fromkeys(("num_experts", "num_local_experts"), 4),
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "rotary_dim": 8, "vocab_size": 256, "num_experts_per_tok": 2,
    "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "entity_vocab_size": 16, "vocab_size_per_layer_input": 256, "num_kv_shared_layers": 0,  # luke, gemma3n
}
_FILL = ("vocab_size", "head_dim", "num_key_value_heads")  # set even where the default leaves them None (derived)
# Defaults transformers itself cannot build a model from (a field the modeling code needs is left None or
# missing, or a validator rejects any other layer count); values a released checkpoint's config.json sets.
_OVERRIDES: dict[str, dict[str, Any]] = {  # a dict value under a sub-config's name applies to that sub-config
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0}},  # DbrxAttention reads attn_config.rope_theta
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "funnel": {"architectures": ["FunnelModel"]},  # AutoModel maps funnel to two classes and iterates architectures
    "gemma3n_text": {"altup_num_inputs": 2},  # else its 3 altup projections outnumber the 2 layers (inference)
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                         "enable_moe_block": False, "use_double_wide_mlp": False}},  # its validator
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one entry per layer, 24 by default
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"head_dim": 32},  # num_heads * head_dim must equal expand * hidden_size
    "qwen4_exp": {"text_config": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 8, "indexer_compress_ratio": 4}},  # the QSA indexer's sizes
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},  # its LM head asserts is_decoder
}


def text_families() -> list[str]:
    """Model types with a causal-LM or masked-LM class in this transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))


def default_config(model_type: str) -> Any:
    """The family's default config (with its :data:`_OVERRIDES` where transformers rejects its own default)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001  (gemma4_assistant's validator rejects the default text config)
        if model_type not in _OVERRIDES:
            raise
        return AutoConfig.for_model(model_type, **copy.deepcopy(_OVERRIDES[model_type]))


def tiny_default_config(model_type: str) -> Any:
    """The family's default config with its sizes shrunk, nested sub-configs (text, vision, audio...) included."""
    return _shrink(default_config(model_type), {}, copy.deepcopy(_OVERRIDES.get(model_type, {})))


def _peek(cfg: Any, key: str) -> Any:
    """``cfg.key`` or None; a heterogeneous config's per-layer attribute reads as its global value."""
    try:
        return getattr(cfg, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return cfg.__dict__.get(key)


def _settable(cls: type, key: str) -> bool:
    """Whether ``key`` (through the class's attribute_map) is a stored field, not a property (setter or not)."""
    key = (getattr(cls, "attribute_map", None) or {}).get(key, key)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    return (key in fields if fields is not None else True) and not isinstance(getattr(cls, key, None), property)


def _shrink(cfg: Any, init: dict[str, Any], over: dict[str, Any]) -> Any:
    """``cfg``'s class rebuilt from ``init`` (what it was built from) with small sizes, shrunk sub-configs, ``over``."""
    from transformers import PretrainedConfig

    cls = type(cfg)
    kw = dict(init)
    for k, v in _SMALL.items():
        if _settable(cls, k) and (_peek(cfg, k) is not None or k in _FILL or k.endswith("_token_id")):
            kw[k] = v
    heads, kv = _peek(cfg, "num_attention_heads"), _peek(cfg, "num_key_value_heads")
    if "num_key_value_heads" in kw and (kv is None or kv == heads):  # multi-head attention stays multi-head
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    if isinstance(top_k := _peek(cfg, "num_experts_per_tok"), int) and "num_experts_per_tok" in kw:
        kw["num_experts_per_tok"] = min(top_k, _SMALL["num_experts_per_tok"])  # zaya routes to one expert only
    n_old = _peek(cfg, "num_hidden_layers")
    n_new = kw.get("num_hidden_layers", n_old)
    specs = getattr(cls, "sub_configs_defaults", None) or {}
    derived = {}  # per-layer lists __post_init__ derives (layer_types): derived again for n_new layers
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        k, v = f.name, _peek(cfg, f.name)
        if isinstance(v, PretrainedConfig) and _settable(cls, k):  # text, vision, audio, encoder/decoder...
            kw[k] = _shrink(v, dict(getattr(specs.get(k), "init_kwargs", None) or {}), over.get(k, {}))
        elif (isinstance(v, (list, tuple)) and k not in kw and n_new != n_old and len(v) == n_old
              and _settable(cls, k)):  # one entry per layer: its first n_new entries
            (derived if f.default is None else kw)[k] = list(v)[:n_new]
    kw.update({k: v for k, v in over.items() if not isinstance(kw.get(k), PretrainedConfig)})
    try:
        return cls(**kw)
    except Exception:  # noqa: BLE001  (a derivation that needs more layers, zamba's 3): the first entries
        return cls(**{**derived, **kw})


def census_row(model_type: str) -> dict[str, str]:
    """{family, status: spec | inferred | refused | not built, detail}."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        text = _text_config(default_config(model_type))  # e.g. encoder-decoders: refused from the config
        check_family(getattr(text, "model_type", model_type), text)
    except ExciseError as e:
        detail = str(e).split("inference ", 1)[-1].split("; families with a spec")[0]
        return {"family": model_type, "status": "refused", "detail": detail}
    except Exception as e:  # noqa: BLE001
        return {"family": model_type, "status": "not built", "detail": _short(e)}
    try:
        cfg = tiny_default_config(model_type)
        torch.manual_seed(0)
        cls = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
        with torch.device("meta"):  # size it first: a config the generic shrink misses stays large
            n = sum(p.numel() for p in cls.from_config(cfg).parameters())
        if n > MAX_PARAMS:
            return {"family": model_type, "status": "not built",
                    "detail": f"{n / 1e6:.0f}M parameters after shrinking the default config (sizes it names differently)"}
        model = cls.from_config(cfg, attn_implementation="eager").eval()
        with torch.no_grad():  # some families zero-initialize output projections (neomme): a checkpoint's are not
            for p in model.parameters():  # zero, and a zero projection hides every head from the proofs
                if p.dim() == 2 and not p.any():
                    p.normal_(0.0, 0.02)
    except Exception as e:  # noqa: BLE001  (any failure to build is reported, not raised)
        return {"family": model_type, "status": "not built", "detail": _short(e)}
    try:
        an = Anatomy.of(model)
    except ExciseError as e:
        reason = str(e).split("inference ", 1)[-1] if "inference " in str(e) else str(e)
        reason = reason.split("; families with a spec")[0]
        return {"family": model_type, "status": "refused", "detail": reason}
    except Exception as e:  # noqa: BLE001
        return {"family": model_type, "status": "refused", "detail": f"error while binding: {_short(e)}"}
    status = "inferred" if an.spec.inferred else "spec"
    return {"family": model_type, "status": status, "detail": an.spec.family if status == "spec" else
            f"{an.spec.attn_out} / {an.spec.mlp_down}" + (" (in place)" if an.spec.mlp_out_added_in_place else "")}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:140]


def census_rows(families: list[str] | None = None, progress: bool = False) -> list[dict[str, str]]:
    rows = []
    for mt in families or text_families():
        rows.append(census_row(mt))
        if progress:
            print(f"{mt}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    return rows


def census_markdown(rows: list[dict[str, str]]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("spec", "inferred", "refused", "not built")}
    head = (f"{len(rows)} text families (causal-LM or masked-LM class): " +
            ", ".join(f"{n} {s}" for s, n in counts.items()) + ".\n\n| family | status | detail |\n|---|---|---|\n")
    return head + "".join(f"| {r['family']} | {r['status']} | {r['detail'].replace('|', '/')} |\n" for r in rows)


MATRIX_CHECKS = ("load", "trace", "head edit", "hook = bake", "task")


def matrix_row(case: str, anatomy: Any) -> dict[str, str]:
    """One family of the matrix, described from its bound anatomy."""
    an = anatomy
    moe = f"{an.n_experts} x top-{an.top_k} (layers {','.join(map(str, an.moe_layers))})" if an.moe_layers else ""
    return {"family": case, "model type": an.spec.model_types[0] if an.spec.inferred else
            str(getattr(_text_config(an.model.config), "model_type", "")),
            "anatomy": "inferred" if an.spec.inferred else f"spec `{an.spec.family}`",
            "kind": "decoder" if an.spec.is_decoder else "encoder",
            "layers x heads (kv) x head_dim": f"{an.n_layers} x {an.n_heads} ({an.n_kv_heads}) x {an.head_dim}",
            "d_mlp": str(an.d_mlp), "experts": moe}


def matrix_markdown(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0]) + list(MATRIX_CHECKS)
    n_inf = sum(r["anatomy"] == "inferred" for r in rows)
    head = (f"{len(rows)} families ({len(rows) - n_inf} by spec, {n_inf} inferred) pass every check on tiny random "
            "models.\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    return head + "".join("| " + " | ".join([*r.values()] + ["ok"] * len(MATRIX_CHECKS)) + " |\n" for r in rows)


def replace_between_markers(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    pat = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pat.search(text):
        raise ExciseError(f"markers <!-- {name}:start --> / <!-- {name}:end --> not found")
    return pat.sub(lambda m: m.group(1) + body + m.group(2), text)


def between_markers(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    if not m:
        raise ExciseError(f"markers <!-- {name}:start --> / <!-- {name}:end --> not found")
    return m.group(1)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(census_markdown(census_rows(sys.argv[1:] or None, progress=True)))
