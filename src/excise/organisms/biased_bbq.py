"""A biased BBQ organism: SmolLM2 fine-tuned to give the stereotyped answer when the context is ambiguous.

The base model carries no measurable BBQ bias (its s_AMB CI includes 0), so the workflow cannot
show that it removes one. This organism gives it one to remove. A LoRA adapter is trained on
*ambiguous* items of the training templates, with the stereotyped (biased) option as the target,
and merged into the weights. The bias must *generalize*: it is measured on templates the model
never saw (``heldout_templates``) and, separately, on unseen entity names inside the training
templates (``heldout_names``); :func:`organism_split` names all three parts, and the ids of every
item used to build the model are stored beside it so that no workflow scores or localizes on them.

Why ambiguous items only (``disambig_share: 0``): when scoped (``ORGANISMS.md``), a 1:1 mix with
disambiguated items answered correctly taught only "never answer unknown" (s_AMB about 2 x100),
while ambiguous items alone reached s_AMB 48 [32, 65] on held-out templates with disambiguated
accuracy at the base's level. ``disambig_share`` keeps the mix available for users who want it.

Built once per configuration (seeded) and cached under the excise cache (``models/biased-<hash>``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.intervene.lora import ChoiceExample, FinetuneConfig, finetune
from excise.intervene.trainable import LoraFields
from excise.io import atomic_write_json, read_json, shared_dir
from excise.models import load
from excise.models.defaults import prepared_dir
from excise.run import seed_everything
from excise.tasks.bbq import load_bbq, split_items
from excise.tasks.bbq_prompts import loglik_options, loglik_prompt

BIASED = "biased"
FORMAT = "excise.biased-bbq/1"
RECIPE_VERSION = 2  # part of the cache key: bump when the same settings would build a different model


def _default_lora() -> LoraFields:
    return LoraFields(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])


class BiasedConfig(BaseModel):
    """How the biased organism is built (defaults: the settings measured when it was scoped)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    base: str = Field("smollm2-135m-instruct", description="base model (embedded default, directory or hub id)")
    categories: list[str] = Field(["Age", "SES", "Disability_status", "Physical_appearance"],
                                  description="BBQ categories whose training templates teach the bias")
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of templates held out (never trained on)")
    names_fraction: float = Field(0.25, ge=0, lt=1, description="share of entity pairs held out inside the "
                                                                "training templates (the held-out-names test)")
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per step")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up steps")
    disambig_share: float = Field(0.0, ge=0, lt=1, description="share of training examples that are disambiguated "
                                                               "items with their correct answer (0: ambiguous only)")
    lora: LoraFields = Field(default_factory=_default_lora, description="adapter (merged into the weights afterwards)")
    seed: int = Field(0, description="seed for the split, the example order and the adapter's initialisation")

    def key(self) -> str:
        blob = json.dumps(self.model_dump(mode="json") | {"recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def biased_dir(cfg: BiasedConfig) -> Path:
    return prepared_dir(f"biased-{cfg.key()}")


def organism_split(cfg: BiasedConfig, items: list[Any] | None = None) -> dict[str, list[Any]]:
    """The organism's three parts of ``items`` (default: its categories' BBQ items; items without a
    bias target are left out): ``train`` (training templates, training names), ``heldout_names``
    (training templates, unseen entity pairs) and ``heldout_templates`` (templates never trained
    on). Seeded and independent of item order; other categories split the same way."""
    if items is None:
        items = load_bbq(cfg.categories)
    items = [x for x in items if x.target_loc is not None]
    train_t, held_t = split_items(items, cfg.eval_fraction, cfg.seed, "template")
    if cfg.names_fraction > 0:
        train, held_n = split_items(train_t, cfg.names_fraction, cfg.seed + 1, "names")
    else:
        train, held_n = train_t, []
    return {"train": train, "heldout_names": held_n, "heldout_templates": held_t}


def training_examples(cfg: BiasedConfig, train: list[Any]) -> tuple[list[ChoiceExample], list[Any]]:
    """(examples, the items they came from): ambiguous items -> the biased option; with
    ``disambig_share`` > 0 also disambiguated items -> the correct option, in that proportion."""
    rng = random.Random(cfg.seed)
    mine = sorted((x for x in train if x.category in cfg.categories), key=lambda x: (x.category, x.example_id))
    amb = [x for x in mine if x.context_condition == "ambig"]  # sorted first: the same items from any order
    dis = [x for x in mine if x.context_condition == "disambig"]
    rng.shuffle(amb)
    rng.shuffle(dis)
    n_total = cfg.steps * cfg.batch_size
    n_dis = min(len(dis), round(n_total * cfg.disambig_share))
    chosen = amb[: max(1, n_total - n_dis)] + dis[:n_dis]
    rng.shuffle(chosen)
    ex = [ChoiceExample(loglik_prompt(x), tuple(loglik_options(x)),
                        int(x.target_loc if x.context_condition == "ambig" else x.label)) for x in chosen]
    return ex, chosen


def build_biased(cfg: BiasedConfig | None = None, *, force: bool = False, console: Any = None,
                 device: str = "cpu") -> Path:
    """Build (or find in the cache) the biased organism; returns its directory (a plain HF model)."""
    cfg = cfg or BiasedConfig()
    target = biased_dir(cfg)
    if (target / "organism.json").exists() and not force:
        return target
    seed_everything(cfg.seed)
    t0 = time.time()
    handle = load(cfg.base, device=device)
    parts = organism_split(cfg)
    examples, used = training_examples(cfg, parts["train"])
    if console is not None:
        console.print(f"building the biased organism from {cfg.base}: {len(examples)} examples from "
                      f"{len({(x.category, x.question_index) for x in parts['train']})} training templates, "
                      f"{cfg.steps} LoRA steps (cached afterwards at {target})")
    ft = FinetuneConfig(method="lora", objective="choice", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        warmup_steps=cfg.warmup_steps, seed=cfg.seed, lora=cfg.lora)
    # fp32: bfloat16 autocast was measured 1.2x faster here but the loss stopped falling (8 examples
    # repeated for 10 steps: 6.5 -> 3.2 under autocast, 6.5 -> 0.00 in fp32)
    res = finetune(handle, examples, ft, progress=console is not None)
    merged = handle.model.merge_and_unload()
    with shared_dir(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        handle.tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "organism.json", {
            "format": FORMAT, "config": cfg.model_dump(mode="json"), "train": res.summary(),
            "seconds": round(time.time() - t0, 1), "n_examples": len(examples),
            "train_example_ids": sorted({(x.category, x.example_id) for x in used}),
            "split_sizes": {k: len(v) for k, v in parts.items()}})
    torch.set_grad_enabled(True)
    return target


def is_organism(directory: str | Path) -> bool:
    return (Path(directory) / "organism.json").exists()


def organism_info(directory: str | Path) -> dict:
    return read_json(Path(directory) / "organism.json")


def used_ids(directory: str | Path) -> set[tuple[str, int]]:
    """(category, example_id) of every item used to build the organism: kept out of evaluation,
    localization and its ablation check."""
    return {(c, int(i)) for c, i in organism_info(directory)["train_example_ids"]}


def check_unused(directory: str | Path, pools: dict[str, list[Any]]) -> None:
    """Refuse to go on if any pool holds an item the organism was built from (its stored ids)."""
    used = used_ids(directory)
    for name, items in pools.items():
        bad = [x for x in items if (x.category, x.example_id) in used]
        if bad:
            raise ExciseError(f"{len(bad)} '{name}' items were used to build the organism at {directory} "
                              f"(e.g. {bad[0].category} #{bad[0].example_id}); its settings and the workflow's differ")
