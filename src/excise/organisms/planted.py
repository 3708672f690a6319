"""A planted-bias model: SmolLM2 with a BBQ bias implanted in chosen attention heads only.

Localization methods need ground truth. We fine-tune *only* the parameter slices that belong to
a few chosen heads -- their query-projection rows and their columns of the attention output
projection (``q_proj`` rows [h*d:(h+1)*d], ``o_proj`` columns likewise) -- through a gradient
mask, on the stereotyped (biased) answers to ambiguous BBQ items of the train split. Key/value
projections are left alone because with grouped-query attention they are shared by several
query heads (``params: qkvo`` trains them too, for whole key/value groups). Every other weight is
bit-identical to the base (checked and recorded), so whatever the implant does lives in the
planted heads by construction. Whether each planted head *carries* a consistent bias is a separate,
measured question (``benchmarks/planted_implant.py``; docs/bbq_mitigation.md): with the shipped
settings the implant shifts the biased log-odds by about +1.3 nats on held-out items but with a
per-item SD of about 3.5, and mostly through one head.

The model is built once per configuration (seeded; rebuilding gives the same weights on CPU)
and cached as safetensors under the excise cache (``models/planted-<hash>``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from excise.errors import ExciseError
from excise.intervene.lora import ChoiceExample, FinetuneConfig, finetune
from excise.io import atomic_write_json, read_json, shared_dir
from excise.models import load
from excise.models.defaults import prepared_dir
from excise.run import seed_everything
from excise.tasks.bbq import load_bbq, sample_bbq, split_items
from excise.tasks.bbq_prompts import loglik_options, loglik_prompt


class PlantedConfig(BaseModel):
    """How the planted-bias model is built."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    base: str = Field("smollm2-135m-instruct", description="base model (embedded default, directory or hub id)")
    heads: list[tuple[int, int]] = Field([(18, 4), (20, 3), (22, 7)],
                                         description="the planted heads as (layer, head): the only units trained")
    params: str = Field("qo", pattern="^(q|o|qo|qkvo)$", description=(
        "which head slices train: q (query rows), o (output-projection columns), both, or qkvo (also the "
        "key/value rows of the heads' key/value group; the planted heads must then be whole groups)"))
    categories: list[str] = Field(["SES", "Disability_status"],
                                  description="BBQ categories whose ambiguous train items teach the bias (both "
                                              "target one group in every template: low SES, disabled)")
    n_train: int = Field(1000, ge=8, description="ambiguous train items per category (at most what the split has; "
                                                 "1000 gives 1404 for SES + Disability_status: under one epoch)")
    steps: int = Field(120, ge=1, description="optimizer steps (per head when independent)")
    batch_size: int = Field(8, ge=1, description="examples per step")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate (weight decay 0 keeps updates inside the mask)")
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of split units held out (same split as the workflow)")
    split_by: str = Field("names", pattern="^(template|names)$",
                          description="held-out unit (same as the workflow's split_by)")
    objective: str = Field("pair", pattern="^(pair|choice)$",
                           description="pair: cross-entropy between the biased and the other entity's answer only "
                                       "(so training cannot merely avoid 'unknown'); choice: over all three options")
    independent: bool = Field(False, description=(
        "plant each head in its own run from the base weights and add the implants, instead of one joint "
        "run. Meant to stop one head doing all the work; measured, the summed implants carry no "
        "consistent bias (held-out shift +0.4 nats, SD 4.2), so the default is one joint run"))
    seed: int = Field(0, description="seed for the item sample and training order")

    @model_validator(mode="after")
    def _kv_needs_joint(self) -> "PlantedConfig":
        if "k" in self.params and self.independent:
            raise ValueError("params 'qkvo' trains key/value rows shared by a group of heads: set independent: false")
        return self

    def key(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def planted_dir(cfg: PlantedConfig) -> Path:
    return prepared_dir(f"planted-{cfg.key()}")


def head_grad_masks(handle: Any, heads: list[tuple[int, int]], params: str = "qo") -> dict[str, Any]:
    """0/1 gradient masks selecting each head's query rows and output-projection columns, and with
    ``k``/``v`` in ``params`` the key/value rows of its key/value head. Keys and values are shared by
    every query head of a group under grouped-query attention, so then ``heads`` must hold whole
    groups: otherwise a head outside the planted set would change."""
    an = handle.anatomy
    group = an.n_heads // (an.n_kv_heads or an.n_heads)  # query heads per key/value head
    if "k" in params or "v" in params:
        wanted = {(l, (h // group) * group + i) for l, h in heads for i in range(group)}
        missing = sorted(wanted - {tuple(x) for x in heads})
        if missing:
            raise ExciseError(f"params '{params}' train key/value heads shared by {group} query heads; "
                              f"add {missing} to the planted heads (whole groups only)")
    names = {id(p): n for n, p in handle.model.named_parameters()}
    masks: dict[str, Any] = {}
    d = an.head_dim
    for l, h in heads:
        if not (0 <= l < an.n_layers and 0 <= h < an.n_heads):
            raise ExciseError(f"planted head ({l}, {h}) out of range [{an.n_layers} layers x {an.n_heads} heads]")
        if "o" in params:
            w = an.attn_out(l).weight
            m = masks.setdefault(names[id(w)], torch.zeros_like(w))
            if an.spec.attn_out_transposed:
                m[h * d:(h + 1) * d, :] = 1
            else:
                m[:, h * d:(h + 1) * d] = 1
        if "q" in params:
            q = getattr(an.attn(l), "q_proj", None)
            if q is None:
                raise ExciseError(f"family '{an.spec.family}' has no separate q_proj; use params='o'")
            m = masks.setdefault(names[id(q.weight)], torch.zeros_like(q.weight))
            m[h * d:(h + 1) * d, :] = 1
        for name in ("k", "v"):
            if name not in params:
                continue
            proj = getattr(an.attn(l), f"{name}_proj", None)
            if proj is None:
                raise ExciseError(f"family '{an.spec.family}' has no separate {name}_proj; use params='qo'")
            g = h // group
            m = masks.setdefault(names[id(proj.weight)], torch.zeros_like(proj.weight))
            m[g * d:(g + 1) * d, :] = 1
    return masks


def train_items(cfg: PlantedConfig) -> list[Any]:
    """Ambiguous train-split items with a bias target, stratified by polarity (seeded)."""
    items = [x for x in load_bbq(cfg.categories) if x.target_loc is not None]
    train, _ = split_items(items, cfg.eval_fraction, cfg.seed, cfg.split_by)
    amb = [x for x in train if x.context_condition == "ambig"]
    return sample_bbq(amb, cfg.n_train, seed=cfg.seed + 1)


def build_planted(cfg: PlantedConfig | None = None, *, force: bool = False, console: Any = None) -> Path:
    """Build (or find in the cache) the planted-bias model; returns its directory."""
    cfg = cfg or PlantedConfig()
    target = planted_dir(cfg)
    if (target / "planted.json").exists() and not force:
        return target
    seed_everything(cfg.seed)
    t0 = time.time()
    handle = load(cfg.base)
    before = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
    items = train_items(cfg)
    examples = []
    for x in items:
        opts = loglik_options(x)
        if cfg.objective == "pair":  # every example has two options, so batches stay rectangular
            if x.anti_biased_index is not None:
                examples.append(ChoiceExample(loglik_prompt(x), (opts[x.target_loc], opts[x.anti_biased_index]), 0))
        else:
            examples.append(ChoiceExample(loglik_prompt(x), tuple(opts), int(x.target_loc)))
    heads = [tuple(h) for h in cfg.heads]
    masks = head_grad_masks(handle, heads, cfg.params)
    if console is not None:
        console.print(f"planting a bias in heads {cfg.heads} of {cfg.base}: {len(examples)} ambiguous items, "
                      f"{len(cfg.heads) if cfg.independent else 1} x {cfg.steps} steps (cached afterwards at {target})")
    def train(group: list[tuple[int, int]], grad_masks: dict[str, Any], seed: int) -> dict[str, Any]:
        res = finetune(handle, examples, FinetuneConfig(method="masked", steps=cfg.steps, batch_size=cfg.batch_size,
                                                        lr=cfg.lr, seed=seed, weight_decay=0.0),
                       grad_masks=grad_masks, progress=console is not None)
        return {"heads": [list(h) for h in group]} | res.summary()

    if not cfg.independent:
        runs = [train(heads, masks, cfg.seed)]
    else:  # one run per head from the base weights; the model gets the sum of the implants
        delta: dict[str, Any] = {}
        runs = []
        for gi, hd in enumerate(heads):
            with torch.no_grad():
                for n, p in handle.model.named_parameters():
                    if n in masks:
                        p.copy_(before[n])
            runs.append(train([hd], head_grad_masks(handle, [hd], cfg.params), cfg.seed + gi))
            for n, p in handle.model.named_parameters():
                if n in masks:
                    delta[n] = delta.get(n, 0) + (p.detach() - before[n])
        with torch.no_grad():
            for n, p in handle.model.named_parameters():
                if n in delta:
                    p.copy_(before[n] + delta[n])
    # honesty check: nothing outside the planted slices changed
    changed_outside = 0.0
    changed_inside = 0.0
    for n, p in handle.model.named_parameters():
        diff = (p.detach() - before[n]).abs()
        if n in masks:
            changed_outside = max(changed_outside, float((diff * (1 - masks[n])).max()))
            changed_inside = max(changed_inside, float((diff * masks[n]).max()))
        else:
            changed_outside = max(changed_outside, float(diff.max()))
    if changed_outside != 0.0:
        raise ExciseError(f"planting changed weights outside the planted heads (max |diff| {changed_outside})")
    with shared_dir(target) as tmp:
        handle.model.save_pretrained(str(tmp), safe_serialization=True)
        handle.tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "planted.json", {
            "format": "excise.planted/1", "config": cfg.model_dump(mode="json"), "heads": [list(h) for h in cfg.heads],
            "n_train_items": len(examples), "train": runs, "max_change_outside_heads": changed_outside,
            "max_change_inside_heads": changed_inside, "seconds": round(time.time() - t0, 1),
            "train_example_ids": [[x.category, x.example_id] for x in items]})
    del before
    torch.set_grad_enabled(True)
    return target


def planted_heads(directory: str | Path) -> list[tuple[int, int]]:
    info = read_json(Path(directory) / "planted.json")
    return [tuple(h) for h in info["heads"]]
