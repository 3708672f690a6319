"""`excise plan RECIPE.yaml`: GPU memory and time of a recipe, estimated from the model's config alone.

No weights are read: the model is instantiated on PyTorch's ``meta`` device, which gives the exact
parameter count (and the exact LoRA parameter count for the recipe's target modules) of any
family transformers knows. The config comes from the local Hugging Face cache or directory when
present, else from :data:`KNOWN_CONFIGS` (the public config.json values of the seed-scale models,
so a plan works offline). Each workflow's stages are read from its validated config.

Memory per GPU, for a stage (bytes; ``w`` = bytes per weight of the recipe's dtype):

* weights ``P w`` (FSDP: divided by the number of GPUs);
* training: gradients ``T w``, Adam's two moments ``8 T`` and, for 16-bit weights, an fp32 master
  copy ``4 T`` for the ``T`` trainable parameters (all of them for full fine-tuning, the adapter
  for LoRA; FSDP shards these too);
* activations kept for the backward pass, per layer ``s b d (34 + 5 a s / d) w / 2`` (Korthikanti et
  al., 2022, for 16-bit activations), or ``2 s b d w`` per layer plus one layer in full with
  gradient checkpointing;
* forward-only stages: the KV cache ``2 L b s n_kv d_head w`` and the logits ``b s V 4``.

Time: ``2 P`` FLOPs per token forward, ``6 P`` for full training, ``4 P`` for LoRA (no weight
gradients for the frozen base), ``+ 2 P`` with gradient checkpointing (the recomputed forward),
at ``mfu`` of the GPU's peak dense bf16 throughput.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from excise.config import apply_overrides, load_yaml, validate
from excise.errors import ExciseError
from excise.recipes.bbq_debias import BBQDebiasConfig
from excise.recipes.caption_config import CaptionBiasConfig
from excise.recipes.concept_config import ConceptUnlearnConfig
from excise.recipes.fair_config import FairEncoderConfig
from excise.recipes.loader import find_recipe
from excise.recipes.robust_config import RobustUnlearnConfig

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Public config.json values (hidden, layers, heads, KV heads, MLP width, vocabulary): enough to
# instantiate each model on the meta device offline.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072),
    "Qwen/Qwen2.5-3B-Instruct": dict(
        model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    "BAAI/bge-large-en-v1.5": dict(
        model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        vocab_size=30522, max_position_embeddings=512),
    "llava-hf/llava-1.5-7b-hf": dict(
        model_type="llava", image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, vocab_size=32064,
                         max_position_embeddings=4096)),
}
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "deberta-v2", "distilbert", "electra", "modernbert")
GPUS = {"h100": (989.0, 80), "h200": (989.0, 141), "a100": (312.0, 80), "a10g": (125.0, 24), "l4": (121.0, 24),
        "rtx4090": (165.0, 24)}  # peak dense bf16 TFLOP/s, memory GiB


@dataclass
class StagePlan:
    """One stage of a recipe as the estimate sees it."""

    name: str
    kind: str  # forward | train
    batch: int
    seq_len: int
    tokens: float  # tokens processed by the stage in total
    method: str = "none"  # full | lora | none
    lora_targets: Any = None
    lora_r: int = 8
    note: str = ""


@dataclass
class Shape:
    n_params: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    config: Any = field(repr=False, default=None)
    encoder: bool = False  # no LM head, no KV cache: a forward pass keeps only its hidden states


def resolve_config(model: str) -> Any:
    """The model's transformers config: local directory or HF cache first, else :data:`KNOWN_CONFIGS`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        pass
    if model in KNOWN_CONFIGS:
        spec = dict(KNOWN_CONFIGS[model])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    raise ExciseError(f"no config for '{model}': not a local directory, not in the Hugging Face cache, not one of "
                      f"the known seed-scale models ({', '.join(KNOWN_CONFIGS)}); download its config.json first")


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    encoder = config.model_type in ENCODER_TYPES
    with torch.device("meta"):
        for auto in ((AutoModel,) if encoder else (AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel)):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise ExciseError(f"transformers cannot build model type '{config.model_type}' from its config")


def shape_of(config: Any) -> Shape:
    model = _meta_model(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    d = int(text.hidden_size)
    return Shape(n_params=int(sum(p.numel() for p in model.parameters())), d_model=d,
                 n_layers=int(text.num_hidden_layers), n_heads=heads,
                 n_kv=int(getattr(text, "num_key_value_heads", None) or heads),
                 head_dim=int(getattr(text, "head_dim", None) or d // heads), vocab=int(text.vocab_size), config=model,
                 encoder=config.model_type in ENCODER_TYPES)


def lora_param_count(model: Any, targets: Any, r: int) -> int:
    """Exact adapter size: r (in + out) for every Linear whose name matches peft's rule for ``targets``."""
    import torch.nn as nn

    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if targets is None:
            hit = name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "query", "value", "c_attn", "query_key_value")
        elif isinstance(targets, str):
            hit = targets == "all-linear" and "lm_head" not in name or bool(re.fullmatch(targets, name))
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            n += r * (mod.in_features + mod.out_features)
    return n


def stage_memory(shape: Shape, st: StagePlan, dtype: str, *, n_gpus: int = 1, fsdp: bool = False,
                 grad_ckpt: bool = False) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring for the formulas)."""
    w = BYTES[dtype]
    shard = n_gpus if fsdp else 1
    out = {"weights": shape.n_params * w / shard}
    b, s, d, L = st.batch / (n_gpus if n_gpus > 1 else 1), st.seq_len, shape.d_model, shape.n_layers
    b = max(b, 1)
    if st.kind == "train":
        t = shape.n_params if st.method == "full" else lora_param_count(shape.config, st.lora_targets, st.lora_r)
        out["grads"] = t * w / shard
        out["optimizer"] = 8 * t / shard + (4 * t / shard if w < 4 else 0)
        per_layer = s * b * d * (34 + 5 * shape.n_heads * s / d) * w / 2
        out["activations"] = (2 * s * b * d * w * L + per_layer) if grad_ckpt else per_layer * L
        if not shape.encoder:
            out["logits"] = b * s * shape.vocab * 4
    elif shape.encoder:
        out["activations"] = 4 * b * s * d * w + b * shape.n_heads * s * s * w  # a layer's largest tensors
    else:
        out["kv_cache"] = 2 * L * b * s * shape.n_kv * shape.head_dim * w
        out["logits"] = b * s * shape.vocab * 4
    return out


def stage_flops(shape: Shape, st: StagePlan, grad_ckpt: bool) -> float:
    per_token = 2.0
    if st.kind == "train":
        per_token = (6.0 if st.method == "full" else 4.0) + (2.0 if grad_ckpt else 0.0)
    return per_token * shape.n_params * st.tokens


def plan_table(model: str, dtype: str, stages: list[StagePlan], *, gpu: str = "h100", n_gpus: int = 1,
               fsdp: bool = False, grad_ckpt: bool = False, mfu: float = 0.35,
               gpu_memory_gib: float | None = None, _config: Any = None) -> dict[str, Any]:
    """The estimate for every stage; ``fits`` is False when any stage exceeds the GPU's memory."""
    if gpu not in GPUS:
        raise ExciseError(f"unknown GPU '{gpu}'; choose one of {', '.join(GPUS)}")
    if dtype not in BYTES:
        raise ExciseError(f"unknown dtype '{dtype}'; choose one of {', '.join(BYTES)}")
    tflops, mem = GPUS[gpu]
    mem = gpu_memory_gib or mem
    shape = shape_of(_config if _config is not None else resolve_config(model))
    model = model or f"{_config.model_type} ({shape.n_layers} layers, d {shape.d_model})"
    rows = []
    for st in stages:
        parts = stage_memory(shape, st, dtype, n_gpus=n_gpus, fsdp=fsdp, grad_ckpt=grad_ckpt)
        total = sum(parts.values()) * 1.1  # 10% for the CUDA context, allocator fragmentation and buffers
        seconds = stage_flops(shape, st, grad_ckpt) / (tflops * 1e12 * mfu * n_gpus)
        rows.append({"stage": st.name, "kind": st.kind, "method": st.method, "batch": st.batch, "seq_len": st.seq_len,
                     "tokens": int(st.tokens), "gib": {k: round(v / GIB, 2) for k, v in parts.items()},
                     "total_gib": round(total / GIB, 2), "seconds": round(seconds, 1), "note": st.note,
                     "fits": total / GIB <= mem})
    return {"model": model, "n_params": shape.n_params, "dtype": dtype, "gpu": gpu, "gpu_memory_gib": mem,
            "n_gpus": n_gpus, "fsdp": fsdp, "gradient_checkpointing": grad_ckpt, "mfu": mfu, "stages": rows,
            "peak_gib": max(r["total_gib"] for r in rows) if rows else 0.0,
            "total_seconds": round(sum(r["seconds"] for r in rows), 1), "fits": all(r["fits"] for r in rows)}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"{p['model']}: {p['n_params'] / 1e9:.3f} B parameters, {p['dtype']}, {p['n_gpus']} x {p['gpu']} "
             f"({p['gpu_memory_gib']:.0f} GiB){', FSDP' if p['fsdp'] else ''}"
             f"{', gradient checkpointing' if p['gradient_checkpointing'] else ''}; MFU {p['mfu']:.0%}",
             "| stage | kind | batch x seq | tokens | GiB per GPU (parts) | total GiB | est. s |",
             "|---|---|---|---|---|---|---|"]
    for r in p["stages"]:
        parts = ", ".join(f"{k} {v:g}" for k, v in r["gib"].items())
        flag = "" if r["fits"] else " (does not fit)"
        lines.append(f"| {r['stage']} | {r['kind']}{'/' + r['method'] if r['method'] != 'none' else ''} | "
                     f"{r['batch']} x {r['seq_len']} | {r['tokens']:,} | {parts} | {r['total_gib']}{flag} | "
                     f"{r['seconds']:g} |")
    lines.append(f"peak {p['peak_gib']} GiB per GPU; about {math.ceil(p['total_seconds'] / 60)} min of compute "
                 f"(estimates: docs/gpu.md)")
    return "\n".join(lines)


# --- each workflow's stages, read from its validated config ---------------------------------------

BBQ_SEQ, CONCEPT_SEQ, CAPTION_TEXT = 256, 128, 48  # typical prompt + answer lengths in tokens
N_BBQ_CATEGORIES = 11


def _bbq(cfg: Any) -> list[StagePlan]:
    n_cat = len(cfg.categories) if cfg.categories else N_BBQ_CATEGORIES
    evals = n_cat * cfg.per_category
    ft = cfg.finetune
    return [StagePlan("eval_before", "forward", cfg.batch_size, BBQ_SEQ, evals * BBQ_SEQ * 3, note="3 answer options"),
            StagePlan("localize", "train", cfg.batch_size, BBQ_SEQ, n_cat * cfg.pairs_per_category * 2 * BBQ_SEQ,
                      "lora", [], note="gradients to activations only; + head ablations"),
            StagePlan("finetune", "train", ft.batch_size, BBQ_SEQ, ft.steps * ft.batch_size * BBQ_SEQ, ft.method,
                      ft.lora.target_modules, ft.lora.r),
            StagePlan("eval_after", "forward", cfg.batch_size, BBQ_SEQ, 2 * evals * BBQ_SEQ * 3)]


def _concept(cfg: Any) -> list[StagePlan]:
    u, n_probe = cfg.unlearn, 200  # probes: direct, paraphrase, adversarial and retain questions
    tokens = u.steps * u.batch_size * CONCEPT_SEQ * 2
    out = [StagePlan("probe_before", "forward", 8, CONCEPT_SEQ, n_probe * (CONCEPT_SEQ + cfg.max_new_tokens)),
           StagePlan("localize", "train", cfg.localize.batch_size, CONCEPT_SEQ, n_probe * CONCEPT_SEQ, "lora", []),
           StagePlan("unlearn", "train", u.batch_size, CONCEPT_SEQ, tokens, "lora", cfg.lora.target_modules, cfg.lora.r,
                     note="forget + retain batch per step")]
    if cfg.compare:
        variants = cfg.comparison.variants
        out.append(StagePlan("compare", "train", u.batch_size, CONCEPT_SEQ, tokens * len(variants),
                             "full" if any(v.startswith("full_ft") for v in variants) else "lora", cfg.lora.target_modules, cfg.lora.r,
                             note=f"{len(variants)} variants at equal steps"))
        rl = cfg.comparison.relearn
        out.append(StagePlan("relearn", "train", u.batch_size, CONCEPT_SEQ,
                             rl.steps * u.batch_size * CONCEPT_SEQ * len(variants), rl.mode))
    out.append(StagePlan("probe_after", "forward", 8, CONCEPT_SEQ, n_probe * (CONCEPT_SEQ + cfg.max_new_tokens)))
    return out


def _fair(cfg: Any) -> list[StagePlan]:
    out = []
    for name in ("plain", "fair"):
        f = getattr(cfg, name)
        n = cfg.train_limit or 7136
        out.append(StagePlan(name, "train", f.batch_size, f.max_length, f.epochs * n * f.max_length, "lora",
                             f.lora.target_modules, f.lora.r))
    out.append(StagePlan("evaluate", "forward", cfg.fair.eval_batch_size, cfg.fair.max_length, 20000 * cfg.fair.max_length))
    return out


def _captions(cfg: Any) -> list[StagePlan]:
    image_tokens = 576  # LLaVA-1.5: (336 / 14)^2 patches
    seq = image_tokens + CAPTION_TEXT
    tr = cfg.mitigate.train
    return [StagePlan("extract", "forward", cfg.extract.batch_size, seq, cfg.n_locate * seq),
            StagePlan("lora", "train", tr.batch_size, seq, tr.steps * tr.batch_size * seq, "lora",
                      cfg.mitigate.lora.target_modules, cfg.mitigate.lora.r),
            StagePlan("evaluate", "forward", cfg.batch_size, seq,
                      3 * len(cfg.langs) * cfg.n_eval * (seq + cfg.max_new_tokens), note="before, LoRA, SAE edit")]


def _undo(cfg: Any) -> list[StagePlan]:
    p, a = cfg.pretrain, cfg.pretrain.arch
    seq = a.max_len
    un = max(m.steps * m.batch_size * 2 for m in cfg.methods.values()) * seq
    return [StagePlan("pretrain", "train", p.batch_size, seq, p.steps * p.batch_size * seq, "full"),
            StagePlan("unlearn", "train", 32, seq, un * len(cfg.methods), "full"),
            StagePlan("distill", "train", cfg.distill.batch_size, seq,
                      cfg.distill.max_steps * cfg.distill.batch_size * seq * (len(cfg.alphas) + len(cfg.targeted)), "full",
                      note="teacher forward included in the estimate's margin"),
            StagePlan("relearn", "train", cfg.relearn.batch_size, seq,
                      len(cfg.relearn.lrs) * cfg.relearn.steps * cfg.relearn.batch_size * seq, "full")]


STAGES = {"bbq": _bbq, "concept": _concept, "fair": _fair, "captions": _captions, "undo": _undo}


def undo_config(cfg: Any) -> Any:
    """The arithmetic organism's transformers config (UNDO plans the model it pretrains)."""
    from transformers import AutoConfig

    a = cfg.pretrain.arch
    extra = {"head_dim": a.d_model // a.n_heads} if a.family in ("gemma", "gemma2") else {}
    return AutoConfig.for_model(a.family, hidden_size=a.d_model,
                                intermediate_size=a.d_mlp, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                                num_key_value_heads=a.n_heads, vocab_size=1100, max_position_embeddings=a.max_len, **extra)


def plan_recipe(workflow: str, cfg: Any, **kw: Any) -> dict[str, Any]:
    """The plan of a validated workflow config (see :func:`plan_table` for the keyword options)."""
    if workflow not in STAGES:
        raise ExciseError(f"no plan for workflow '{workflow}'; plans exist for {', '.join(STAGES)}")
    stages = STAGES[workflow](cfg)
    if workflow == "undo":
        return plan_table("", "float32", stages, _config=undo_config(cfg), **kw)
    model = cfg.model
    if workflow == "captions" and model == "organism":
        raise ExciseError("the caption organism trains on CPU in minutes; plan a hub VLM (set model:)")
    return plan_table(model, getattr(cfg, "dtype", "float32"), stages, **kw)


CONFIGS = {"bbq": BBQDebiasConfig, "concept": ConceptUnlearnConfig, "fair": FairEncoderConfig,
           "captions": CaptionBiasConfig, "undo": RobustUnlearnConfig}
PLAN_KEYS = ("gpu", "n_gpus", "fsdp", "gradient_checkpointing", "mfu", "gpu_memory_gib", "accelerate")


def plan_file(recipe: str | Path, overrides: list[str] | None = None, **options: Any) -> dict[str, Any]:
    """Plan a recipe file: its ``plan:`` section (hardware), then ``options`` given on the command line.

    On a machine with CUDA the GPU's real memory is the limit; ``fits`` False means refuse."""
    path = find_recipe(recipe)
    data = apply_overrides(load_yaml(path) or {}, list(overrides or []))
    workflow = data.pop("workflow", None)
    data.pop("out", None)
    hw = data.pop("plan", None) or {}
    if workflow not in CONFIGS:
        raise ExciseError(f"no plan for workflow {workflow!r}; plans exist for {', '.join(CONFIGS)}", where=f"{path}:workflow")
    unknown = sorted(set(hw) - set(PLAN_KEYS))
    if unknown:
        raise ExciseError(f"unknown plan setting '{unknown[0]}'; plan takes {', '.join(PLAN_KEYS)}", where=f"{path}:plan")
    cfg = validate(CONFIGS[workflow], data, str(path))
    hw.update({k: v for k, v in options.items() if v is not None})
    kw = {"gpu": hw.get("gpu", "h100"), "n_gpus": int(hw.get("n_gpus", 1)), "fsdp": bool(hw.get("fsdp", False)),
          "grad_ckpt": bool(hw.get("gradient_checkpointing", False)), "mfu": float(hw.get("mfu", 0.35)),
          "gpu_memory_gib": hw.get("gpu_memory_gib")}
    import torch

    if kw["gpu_memory_gib"] is None and torch.cuda.is_available():
        kw["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    out = plan_recipe(workflow, cfg, **kw)
    out["recipe"], out["workflow"], out["accelerate"] = str(path), workflow, hw.get("accelerate")
    return out
