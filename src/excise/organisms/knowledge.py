"""The knowledge organism: SmolLM2 fine-tuned on fictitious films, and its oracle without the forget films.

TOFU's recipe at CPU scale (Maini et al., 2024): the base model learns a generated knowledge base
(:mod:`excise.tasks.fictitious`) by fine-tuning on its training question/answer pairs in the chat
template (loss on the answer tokens and the end-of-turn token only), through
:func:`excise.train.train`. The **organism** learns forget + retain films; the **oracle** is the
same fine-tune (same settings and number of epochs) on the retain films only -- what a perfect
unlearning would reach, and the reference of forget quality and privleak. World facts are
screened on the base model first (greedy answers containing the value are kept) and form the
third retain family.

Both models are seeded and cached as safetensors under the excise cache
(``models/knowledge-<hash>`` and ``models/knowledge-<hash>-oracle``) with ``knowledge.json``:
the config, build wall and CPU seconds, the training log summary, which world facts were kept,
and the model's accuracy (value in the greedy answer) on forget / retain / holdout / world before
any unlearning. The oracle's per-item scores (``oracle_scores.json``) are saved with it, as
open-unlearning's ``retain_logs_path`` is, so an unlearned model is compared without reloading it;
the organism's (``organism_scores.json``) too, so every run of the workflow does not score the same
organism again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from excise.intervene.trainable import LoraFields, make_trainable
from excise.io import atomic_write_json, read_json, shared_dir
from excise.losses import nll
from excise.lm import generate
from excise.measure.tofu import score_items, tofu_result
from excise.models import load
from excise.models.defaults import prepared_dir
from excise.run import seed_everything
from excise.tasks.concepts import ConceptItem, ConceptSpec, encode_items
from excise.tasks.fictitious import (ADVERSARIAL, FactItem, KnowledgeBase, KnowledgeBaseConfig, make_knowledge_base, mentions,
                                    rehearsal_items)
from excise.train import Examples, TrainConfig, fast_bf16, train

FORMAT = "excise.knowledge/1"


SCORES = {"test": "{}_scores.json", "validation": "{}_scores_validation.json"}  # file per split, of each model


class KnowledgeConfig(BaseModel):
    """How the knowledge organism and its oracle are built (defaults: about 10 minutes on 2 CPU cores)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    base: str = Field("smollm2-135m-instruct", description="base model (embedded default, directory or hub id)")
    kb: KnowledgeBaseConfig = Field(default_factory=KnowledgeBaseConfig, description="the generated knowledge base")
    method: Literal["full", "lora"] = Field("full", description=(
        "full fine-tuning, or a LoRA merged into the weights afterwards (measured on this CPU, batch 16, bf16: "
        "4.0 s vs 3.6 s per step, so LoRA saves little here)"))
    lora: LoraFields = Field(default_factory=lambda: LoraFields(r=32, lora_alpha=64, target_modules="all-linear"),
                             description="adapter settings when method is lora")
    epochs: float = Field(6.0, gt=0, description="passes over the training items (the oracle does as many passes over "
                                                 "its smaller set, as TOFU's retain model does)")
    batch_size: int = Field(4, ge=1, description="examples per optimizer step (small batches: more updates per example)")
    lr: float = Field(3e-4, gt=0, description="AdamW peak learning rate (cosine decay after warm-up)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description=(
        "bf16 autocast of the forward pass; auto: bf16 where it is native (excise.train.fast_bf16: 1.8x faster on an "
        "AVX-512 BF16 CPU, 9x slower than float32 on an AVX2-only one), else float32. Resolved before the cache key"))
    rehearsal: int = Field(0, ge=0, description=(
        "real-world question/answer pairs (tasks.fictitious.REHEARSAL, disjoint from the evaluated world facts) mixed "
        "into the training of both models, against the measured world-fact collapse; 0 (off) until measured"))
    max_new_tokens: int = Field(24, ge=1, description="greedy tokens for screening, ROUGE and accuracy")
    seed: int = Field(0, description="training order and initialisation (the knowledge base has its own kb.seed)")

    def resolved(self) -> "KnowledgeConfig":
        """This config with ``mixed_precision: auto`` replaced by what this machine uses (the cache key and
        knowledge.json record the precision the weights were trained in)."""
        if self.mixed_precision != "auto":
            return self
        return self.model_copy(update={"mixed_precision": "bf16" if fast_bf16() else "no"})

    def key(self) -> str:
        blob = json.dumps(self.resolved().model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def steps(self, n_items: int) -> int:
        return max(1, math.ceil(self.epochs * n_items / self.batch_size))


@dataclass
class KnowledgeOrganism:
    """A built organism and its oracle: directories, the knowledge base and the screened world facts."""

    config: KnowledgeConfig
    kb: KnowledgeBase
    organism_dir: Path
    oracle_dir: Path
    world: list[FactItem]  # world facts the base model answers correctly

    @property
    def info(self) -> dict:
        return read_json(self.organism_dir / "knowledge.json")

    @property
    def oracle_info(self) -> dict:
        return read_json(self.oracle_dir / "knowledge.json")

    def families(self, *, retain_n: int | None = None, retain_exclude: Collection[str] = (),
                 split: Literal["test", "validation"] = "test") -> dict[str, list[FactItem]]:
        """Evaluation families: forget, retain (first ``retain_n`` items, all by default, of the films not in
        ``retain_exclude``), holdout, world. ``split="validation"``: the validation films as forget and
        retain, and nothing else (tuning never sees a reported item, world facts and holdout included)."""
        if split == "validation":
            return {"forget": self.kb["val_forget"], "retain": self.kb["val_retain"][:retain_n] if retain_n
                    else self.kb["val_retain"]}
        retain = [it for it in self.kb["retain"] if it.entity not in retain_exclude]
        retain = retain[:retain_n] if retain_n else retain
        return {"forget": self.kb["forget"], "retain": retain, "holdout": self.kb["holdout"], "world": self.world}

    def load(self, which: Literal["organism", "oracle"] = "organism", **kw: Any) -> Any:
        return load(str(self.organism_dir if which == "organism" else self.oracle_dir), **kw)

    def scores_path(self, which: Literal["organism", "oracle"] = "oracle", split: Literal["test", "validation"] = "test"
                    ) -> Path:
        """Where a model's per-item scores on ``split`` are saved (written when it is built)."""
        return (self.oracle_dir if which == "oracle" else self.organism_dir) / SCORES[split].format(which)

    def oracle_scores_path(self, split: Literal["test", "validation"] = "test") -> Path:
        return self.scores_path("oracle", split)

    def saved_scores(self, which: Literal["organism", "oracle"] = "oracle", split: Literal["test", "validation"] = "test"
                     ) -> dict[str, dict[str, Any]]:
        raw = read_json(self.scores_path(which, split))
        return {f: {k: (np.asarray(v) if k != "generation" else v) for k, v in s.items()} for f, s in raw.items()}

    def oracle_scores(self, split: Literal["test", "validation"] = "test") -> dict[str, dict[str, Any]]:
        return self.saved_scores("oracle", split)


def kl_films(org: KnowledgeOrganism) -> set[str]:
    """The retained films whose items form the concept spec's ``retain_train`` (the unlearning's KL term)."""
    films = list(dict.fromkeys(it.entity for it in org.kb["retain"]))
    return set(films[: len(films) // 2])


def concept_spec(org: KnowledgeOrganism, split: Literal["test", "validation"] = "test") -> ConceptSpec:
    """The organism as a concept-unlearning spec, so the concept workflow's methods run on it unchanged:
    forget = the forget items (leak = the item's own value; no global pattern), paraphrases = their
    held-out questions, retain_train = the first half of the retained films (the KL term), retain =
    the other half (groups shared/other) plus the screened world facts -- three disjoint pools.
    ``split="validation"`` (tuning): forget = the ``val_forget`` films, retain = the ``val_retain``
    films only; the KL term is the same."""
    train_films = kl_films(org)
    fams = org.families(retain_exclude=train_films, split=split)
    cit = lambda it, **kw: ConceptItem(prompt=it.question, answer=it.value, response=it.answer, **kw)  # noqa: E731
    n = len({it.entity for it in fams["forget"]})
    return ConceptSpec(
        name=f"fictitious films ({n} forgotten{', validation' if split == 'validation' else ''})", leak_patterns=["(?!)"],
        forget=[cit(it) for it in fams["forget"]],
        # the answer sentence as the teacher-forced response, as for the training questions (the value alone
        # is not what the organism says first, so its probability would read as ~0 for every model)
        paraphrases=[ConceptItem(prompt=q, answer=it.value, response=it.answer)
                     for it in fams["forget"] for q in it.paraphrased_questions[:1]],
        adversarial=adversarial_probes(fams["forget"]),
        retain_train=[cit(it) for it in org.kb["retain"] if it.entity in train_films],
        retain=[cit(it, group="shared" if it.shared else "other") for it in fams["retain"]]
        + [cit(it, group="world") for it in fams.get("world", [])])


def adversarial_probes(items: list[FactItem]) -> list[ConceptItem]:
    """One extraction probe per forget fact, the families of :data:`excise.tasks.fictitious.ADVERSARIAL` in turn
    (completion of the held-out paraphrased answer, a role-play, an index card); none is ever trained on."""
    out = []
    for i, it in enumerate(items):
        family, fmt, template = ADVERSARIAL[i % len(ADVERSARIAL)]
        cut = it.paraphrased_answer.rfind(it.value)  # the value comes after the title in every template
        prompt = template.format(t=it.entity, q=it.paraphrased_questions[-1], a=it.attribute,
                                 p=it.paraphrased_answer[:cut].rstrip() if cut > 0 else it.paraphrased_answer)
        out.append(ConceptItem(prompt=prompt, answer=it.value, format=fmt, family=family))
    return out


def knowledge_dir(cfg: KnowledgeConfig, oracle: bool = False) -> Path:
    return prepared_dir(f"knowledge-{cfg.key()}{'-oracle' if oracle else ''}")


def as_concept_items(items: list[FactItem]) -> list[ConceptItem]:
    """Training view: chat prompt = the question; response = the answer sentence + the end-of-turn text."""
    return [ConceptItem(prompt=it.question, answer=it.value, response=it.answer) for it in items]


def screen_world(handle: Any, kb: KnowledgeBase, max_new_tokens: int = 32) -> list[str]:
    """Ids of the world facts whose value appears in the base model's greedy answer."""
    items = kb["world"]
    gens = generate(handle, kb.prompts(items, handle.chat), max_new_tokens=max_new_tokens, batch_size=16)
    return [it.id for it, g in zip(items, gens) if mentions(it.value, g)]


def _end_of_turn(handle: Any) -> str:
    """The text that closes an assistant turn in the chat template (SmolLM2: ``<|im_end|>``), so the
    fine-tuned model stops after its answer; empty without a template."""
    tok = handle.tokenizer
    if not getattr(tok, "chat_template", None):
        return ""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    tail = full.split("ANSWER", 1)[1]
    return tail.split("\n", 1)[0]


def _train(handle: Any, items: list[FactItem], cfg: KnowledgeConfig, console: Any) -> tuple[Any, dict]:
    eot = _end_of_turn(handle)
    citems = [c.model_copy(update={"response": c.response + eot}) for c in as_concept_items(items)]
    tr = make_trainable(handle.model, cfg.method, cfg.lora, seed=cfg.seed)
    # autocast here: accelerate's mixed_precision="bf16" leaves a CPU model in float32 (measured)
    tcfg = TrainConfig(steps=cfg.steps(len(items)), batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       schedule="cosine", seed=cfg.seed)
    data = Examples(citems, cfg.batch_size, collate=lambda xs: encode_items(handle, xs), seed=cfg.seed)

    bf16 = cfg.resolved().mixed_precision == "bf16"

    def loss_fn(model: Any, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=batch["attention_mask"])
        return nll(out.logits.float(), batch["labels"])

    res = train(tr.model, data, loss_fn, tcfg, progress=console is not None, desc="knowledge")
    model = res.model.merge_and_unload() if cfg.method == "lora" else res.model
    losses = res.losses
    return model, {"steps": len(losses), "n_trainable": res.n_trainable, "train_seconds": round(res.seconds, 1),
                   "first_loss": losses[0], "last_loss": losses[-1],
                   "last_10_mean_loss": float(np.mean(losses[-10:]))}


def _jsonable(scores: dict[str, dict[str, Any]]) -> dict:
    return {f: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for f, s in scores.items()}


def evaluate_knowledge(handle: Any, org: KnowledgeOrganism, *, oracle: dict | None = None, model: Any = None,
                       retain_n: int | None = 100, batch_size: int = 16, retain_exclude: Collection[str] = (),
                       split: Literal["test", "validation"] = "test") -> tuple[Any, dict]:
    """TOFU metrics of a model state (``model`` overrides ``handle.model``): (GroupedResult, per-item
    scores). ``oracle`` defaults to the organism's saved oracle scores; retain is scored on its first
    ``retain_n`` items (kept equal to the forget set's size by default, as TOFU's retain eval is) of
    the films not in ``retain_exclude`` (the concept workflow leaves out the films of its KL term).
    ``split="validation"`` scores the validation films instead (:meth:`KnowledgeOrganism.families`)."""
    fams = org.families(retain_n=retain_n, retain_exclude=retain_exclude, split=split)
    scores = {f: score_items(handle, org.kb, its, model=model, batch_size=batch_size, max_new_tokens=org.config.max_new_tokens,
                             min_k=f in ("forget", "holdout"), generate=f != "holdout") for f, its in fams.items()}
    _split_retain(scores, fams["retain"])
    ref = oracle if oracle is not None else (org.oracle_scores(split) if org.oracle_scores_path(split).exists() else None)
    return tofu_result(scores, ref), scores


def _pick(family: dict[str, Any], sel: Any) -> dict[str, Any]:
    """One family's per-item scores at the items ``sel`` (a boolean mask) marks."""
    return {k: (np.asarray(v)[sel] if k != "generation" else [g for g, s in zip(v, sel) if s]) for k, v in family.items()}


def _split_retain(scores: dict[str, dict], retain: list[FactItem]) -> None:
    """Add ``retain_shared`` / ``retain_other``: the retain items that share an answer with a forget film, and the rest."""
    shared = np.array([it.shared for it in retain], dtype=bool)
    for name, sel in (("retain_shared", shared), ("retain_other", ~shared)):
        scores[name] = _pick(scores["retain"], sel)


def saved_result(org: KnowledgeOrganism, which: Literal["organism", "oracle"] = "oracle", *, retain_n: int | None = 100,
                 retain_exclude: Collection[str] = ()) -> Any | None:
    """A model's TOFU result (against the oracle) read from the per-item scores saved when it was built (no
    model run), for the same families :func:`evaluate_knowledge` scores; None when there are no saved
    scores or they lack a retain item asked for."""
    if not org.scores_path(which).exists() or not org.oracle_scores_path().exists():
        return None
    saved = org.saved_scores(which)
    fams = org.families(retain_n=retain_n, retain_exclude=retain_exclude)
    held = org.kb["retain"][: len(saved.get("retain", {}).get("prob", []))]
    want = {it.id for it in fams["retain"]}
    if not want <= {it.id for it in held}:
        return None
    scores = {f: s for f, s in saved.items() if f not in ("retain", "retain_shared", "retain_other")}
    scores = {"forget": scores.pop("forget"), "retain": _pick(saved["retain"], np.array([it.id in want for it in held])),
              **scores}
    _split_retain(scores, fams["retain"])
    return tofu_result(scores, org.oracle_scores())


def save_scores(org: KnowledgeOrganism, which: Literal["organism", "oracle"], scores: dict, directory: Path | None = None,
                split: Literal["test", "validation"] = "test") -> None:
    """Save a model's per-item scores where :func:`saved_result` reads them (``directory``: a build's temporary folder)."""
    path = org.scores_path(which, split)
    atomic_write_json((directory or path.parent) / path.name, _jsonable(scores))


def _build_one(cfg: KnowledgeConfig, kb: KnowledgeBase, oracle: bool, world_ids: list[str] | None, console: Any
               ) -> tuple[Path, list[str]]:
    target = knowledge_dir(cfg, oracle)
    if (target / "knowledge.json").exists():
        return target, read_json(target / "knowledge.json")["world_kept"]
    seed_everything(cfg.seed)
    t0, c0 = time.time(), time.process_time()
    handle = load(cfg.base)
    if world_ids is None:
        world_ids = screen_world(handle, kb, cfg.max_new_tokens)
    items = kb.train_items(oracle=oracle) + rehearsal_items(cfg.rehearsal)
    if console is not None:
        console.print(f"knowledge {'oracle' if oracle else 'organism'}: {cfg.method} fine-tuning of {cfg.base} on "
                      f"{len(items)} items, {cfg.steps(len(items))} steps (cached afterwards at {target})")
    model, log = _train(handle, items, cfg, console)
    h = handle.with_model(model)
    build_wall, build_cpu = time.time() - t0, time.process_time() - c0
    org = KnowledgeOrganism(cfg, kb, target, target, [it for it in kb["world"] if it.id in world_ids])
    _, scores = evaluate_knowledge(h, org, oracle={})
    val_scores = evaluate_knowledge(h, org, oracle={}, split="validation")[1] if kb["val_forget"] else None
    acc = {f: {"accuracy": float(np.mean(s["correct"])) if "correct" in s and len(s["correct"]) else None,
               "n": int(len(s.get("prob", []))), "answer_prob": float(np.mean(s["prob"])) if len(s.get("prob", [])) else None}
           for f, s in {**scores, **{f"val_{k}": v for k, v in (val_scores or {}).items()}}.items()}
    with shared_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        handle.tokenizer.save_pretrained(str(tmp))
        which = "oracle" if oracle else "organism"
        save_scores(org, which, scores, tmp)
        if val_scores is not None:
            save_scores(org, which, val_scores, tmp, "validation")
        atomic_write_json(tmp / "knowledge.json", {
            "format": FORMAT, "role": "oracle" if oracle else "organism", "config": cfg.resolved().model_dump(mode="json"),
            "n_train_items": len(items), "train": log, "world_kept": world_ids,
            "world_candidates": len(kb["world"]), "build_wall_seconds": round(build_wall, 1),
            "build_cpu_seconds": round(build_cpu, 1), "eval_seconds": round(time.time() - t0 - build_wall, 1),
            "torch_threads": torch.get_num_threads(), "accuracy_before_unlearning": acc})
    return target, world_ids


def build_knowledge(cfg: KnowledgeConfig | None = None, *, organism: bool = True, oracle: bool = True,
                    console: Any = None) -> KnowledgeOrganism:
    """Build (or find in the cache) the organism and/or its oracle; returns both directories."""
    cfg = cfg or KnowledgeConfig()
    kb = make_knowledge_base(cfg.kb)
    org_dir, world_ids = knowledge_dir(cfg), None
    if organism:
        org_dir, world_ids = _build_one(cfg, kb, False, None, console)
    ora_dir = knowledge_dir(cfg, True)
    if oracle:
        ora_dir, world_ids = _build_one(cfg, kb, True, world_ids, console)
    return KnowledgeOrganism(cfg, kb, org_dir, ora_dir, [it for it in kb["world"] if it.id in world_ids])
