"""Fairness-aware LoRA fine-tuning of text encoders (issue 11): adapter + task head + fairness terms.

:class:`FairEncoder` is a peft-LoRA-wrapped encoder (built by
:func:`excise.intervene.trainable.make_trainable`; the base weights are frozen, see
:func:`changed_base_weights`), a pooled embedding (mean over real tokens as sentence-transformers,
or the first token), a linear task head and, switched on by their lambdas:

* ``lambda_adv``: an MLP adversary predicting the protected group from the embedding through a
  gradient-reversal layer (Ganin & Lempitsky, 2015; Zhang et al., 2018). The adversary learns at
  full rate; the encoder receives ``-lambda_adv`` times the adversary's gradient;
* ``lambda_attr``: an attribute head trained *with* the task (multi-task, no reversal);
* ``lambda_dp`` / ``lambda_eo``: the soft demographic-parity and equalized-odds gaps of the task
  head's probabilities over each batch (:mod:`excise.intervene.fair_losses`).

:func:`fair_finetune` trains it with the project's one loop, :func:`excise.train.train`, in **one
call** spanning every epoch (one optimizer and one warm-up + linear-decay schedule); an epoch is
``ceil(N / batch_size)`` steps of train()'s seeded stream of shuffled passes, and ``on_step`` at
each epoch boundary validates, saves the epoch's adapter + heads
(``checkpoints/epoch-NNN.safetensors``, trainable tensors only), rewrites ``epoch_metrics.csv``
and ``training_history.json`` atomically, and stops early after ``patience`` epochs without
improvement of ``monitor``. Selection (best utility, best fairness, window) is
:mod:`excise.intervene.fair_select`; restoring an epoch, export and loading are
:mod:`excise.intervene.fair_export`; pooling and frozen-encoder embeddings (:func:`embed`, also
re-exported here) are :mod:`excise.intervene.fair_embed`.

Examples are any objects with ``text``, ``label``, ``groups`` (dict attribute -> value) and an
optional ``text_pair`` (query/document: tokenized as a pair), e.g. ``excise.tasks.fairness.FairExample``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import save as st_save
from sklearn.metrics import f1_score

from excise.errors import ExciseError
from excise.intervene.fair_embed import accepted_inputs, embed, pool
from excise.intervene.fair_losses import GradReverse, Reduction, dp_gap, eo_gap, ovr_gaps
from excise.intervene.fair_select import summary
from excise.intervene.trainable import LoraFields, make_trainable
from excise.io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from excise.train import Examples, TrainConfig, train

# query/value projections per encoder family (peft's defaults, stated once; ModernBERT fuses q, k, v)
QV_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
              "camembert": ["query", "value"], "electra": ["query", "value"],
              "deberta-v2": ["query_proj", "value_proj"], "modernbert": ["Wqkv"]}


class FairFinetuneConfig(BaseModel):
    """Settings of one fair fine-tuning run (sources in brackets; the rest are this project's choices)."""

    model_config = {"extra": "forbid"}
    lora: LoraFields = Field(default_factory=LoraFields, description=(
        "adapter, peft LoraConfig fields (r 8, alpha 16); target_modules None: the query and value projections "
        "(Hu et al., 2021; peft's encoder default; ModernBERT: its fused Wqkv)"))
    epochs: int = Field(3, ge=1, description="passes over the training examples (an upper bound with early stopping)")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step (Devlin et al., 2019 recommend 16 or 32)")
    eval_batch_size: int = Field(64, ge=1, description="examples per forward pass when validating and predicting")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate of adapter and heads (Hu et al., 2021, RoBERTa-base)")
    warmup_steps: int | None = Field(None, ge=0, description=(
        "linear warm-up steps before linear decay to 0; None: 6% of all steps (Hu et al., 2021)"))
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (Devlin et al., 2019)")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm (0: off)")
    max_length: int = Field(64, ge=2, description="truncate inputs (pairs: the pair) to this many tokens")
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "mean: average of the last hidden states over real tokens (sentence-transformers); cls: first real token"))
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the embedding before the task and attribute "
                                                             "heads (BERT's classifier dropout)")
    attribute: str | None = Field(None, description="the protected attribute in each example's groups "
                                                    "(None: the only one there is)")
    lambda_adv: float = Field(0.0, ge=0, description=(
        "gradient-reversal scale of the adversary (0: no adversary); Ganin & Lempitsky (2015) ramp it to 1"))
    adv_hidden: int = Field(64, ge=1, description="hidden units of the adversary MLP (one ReLU layer)")
    lambda_attr: float = Field(0.0, ge=0, description="weight of the attribute head's cross-entropy (0: no head)")
    lambda_dp: float = Field(0.0, ge=0, description="weight of the soft demographic-parity gap (0: off)")
    lambda_eo: float = Field(0.0, ge=0, description="weight of the soft one-vs-rest equalized-odds gap (0: off)")
    gap_reduction: Reduction = Field("max_pairwise", description=(
        "multi-valued groups: max_pairwise (largest gap between two groups) or mean_sq (mean squared deviation of "
        "the group means from the batch mean)"))
    monitor: Literal["val_macro_f1", "val_accuracy", "val_loss"] = Field(
        "val_macro_f1", description="validation criterion of early stopping (loss: lower is better)")
    patience: int = Field(2, ge=0, description="stop after this many epochs without improvement of monitor (0: never)")
    min_delta: float = Field(0.0, ge=0, description="smallest change of monitor that counts as an improvement")
    utility_metric: str = Field("val_macro_f1", description="per-epoch column that best_util and windows maximise")
    fairness_metric: Literal["val_eo_gap", "val_tpr_gap", "val_dp_gap"] = Field(
        "val_eo_gap", description="per-epoch column that best_fairness and windows keep small")
    seed: int = Field(0, description="seeds the adapter and head init, dropout and the example order")


# --- the model ------------------------------------------------------------------------------------

class FairEncoder(torch.nn.Module):
    """Encoder (peft LoRA) -> pooled embedding -> task head; adversary (through a GRL) and attribute head optional."""

    def __init__(self, encoder: Any, tokenizer: Any, classes: Sequence[Any], group_values: Sequence[Any],
                 attribute: str, cfg: FairFinetuneConfig):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.classes, self.group_values, self.attribute = list(classes), list(group_values), attribute
        self.cfg = cfg
        self.inputs = accepted_inputs(encoder)
        d, n_c, n_g = int(encoder.config.hidden_size), len(self.classes), len(self.group_values)
        torch.manual_seed(cfg.seed)
        self.dropout = torch.nn.Dropout(cfg.head_dropout)
        self.head = torch.nn.Linear(d, n_c)
        self.grl = GradReverse(cfg.lambda_adv)
        self.adversary = (torch.nn.Sequential(torch.nn.Linear(d, cfg.adv_hidden), torch.nn.ReLU(),
                                              torch.nn.Linear(cfg.adv_hidden, n_g)) if cfg.lambda_adv > 0 else None)
        self.attr_head = torch.nn.Linear(d, n_g) if cfg.lambda_attr > 0 else None
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._group_index = {g: i for i, g in enumerate(self.group_values)}

    @property
    def dim(self) -> int:
        return int(self.head.in_features)

    def collate(self, examples: Sequence[Any], targets: bool = True) -> dict[str, torch.Tensor]:
        """Tokenize (as pairs when examples have ``text_pair``); with ``targets`` add label and group indices."""
        texts = [e.text for e in examples]
        pairs = [getattr(e, "text_pair", None) for e in examples]
        has = [p is not None for p in pairs]
        if any(has) and not all(has):
            raise ExciseError("a batch mixes single texts and text pairs; give every example a text_pair or none")
        enc = self.tokenizer(texts, text_pair=pairs if all(has) else None, padding=True, truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        batch = {k: enc[k] for k in self.inputs if k in enc}
        if targets:
            try:
                batch["labels"] = torch.tensor([self._class_index[e.label] for e in examples])
                batch["groups"] = torch.tensor([self._group_index[e.groups[self.attribute]] for e in examples])
            except KeyError as e:
                raise ExciseError(f"label or group value {e} was not in the training data") from None
        return batch

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(**{k: batch[k] for k in self.inputs if k in batch})
        return pool(out.last_hidden_state, batch["attention_mask"], self.cfg.pooling)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.embed_batch(batch)
        h = self.dropout(z)
        out = {"embedding": z, "logits": self.head(h)}
        if self.adversary is not None:
            out["adv_logits"] = self.adversary(self.grl(z))
        if self.attr_head is not None:
            out["attr_logits"] = self.attr_head(h)
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter and head tensors (what a per-epoch checkpoint holds)."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


def _sorted(values: Any) -> list:
    values = set(values)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def resolve_attribute(examples: Sequence[Any], attribute: str | None) -> str:
    keys = {k for e in examples for k in e.groups}
    if attribute is None:
        if len(keys) != 1:
            raise ExciseError(f"examples carry attributes {sorted(keys)}; set attribute= to the protected one")
        return next(iter(keys))
    missing = sum(1 for e in examples if attribute not in e.groups)
    if missing:
        raise ExciseError(f"{missing} examples have no '{attribute}' group (attributes seen: {sorted(keys)})")
    return attribute


def lora_fields(model: Any, lora: LoraFields) -> LoraFields:
    """``lora`` with target_modules filled in with the family's query/value projections when unset."""
    if lora.target_modules is not None:
        return lora
    targets = QV_TARGETS.get(getattr(model.config, "model_type", ""))
    return lora.model_copy(update={"target_modules": targets}) if targets else lora


def build_fair_encoder(handle: Any, examples: Sequence[Any], cfg: FairFinetuneConfig | None = None, *,
                       classes: Sequence[Any] | None = None) -> FairEncoder:
    """A FairEncoder on a copy of ``handle.model`` (the caller's handle is never modified).

    ``classes``: the label values in head order (e.g. ``range(len(label_names))`` so that output
    ``i`` is label ``i`` even when a class is missing from ``examples``); default: the sorted
    labels of ``examples``.
    """
    cfg = cfg or FairFinetuneConfig()
    if not examples:
        raise ExciseError("fair fine-tuning needs at least one training example")
    attribute = resolve_attribute(examples, cfg.attribute)
    classes = list(classes) if classes is not None else _sorted(e.label for e in examples)
    groups = _sorted(e.groups[attribute] for e in examples)
    model = copy.deepcopy(handle.model)
    if not hasattr(getattr(model, "config", None), "hidden_size"):
        raise ExciseError(f"{handle.name}: not a text encoder with a hidden_size")
    if getattr(model, "pooler", None) is not None:
        # the encoder's own pooler is never used (pool() reads last_hidden_state): without it LoRA does
        # not wrap its dense layer ("dense" targets), which would train nothing and stall DDP's reducer
        model.pooler = None
    peft_model = make_trainable(model, "lora", lora_fields(model, cfg.lora), seed=cfg.seed).model
    return FairEncoder(peft_model, handle.tokenizer, classes, groups, attribute, cfg)


def changed_base_weights(fe: FairEncoder, reference: Any) -> list[str]:
    """Names of base weights that differ from ``reference`` (the original model): empty = base unchanged."""
    ref = reference.state_dict()
    changed = []
    for name, t in fe.encoder.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        if key not in ref or not torch.equal(ref[key].cpu(), t.cpu()):
            changed.append(key)
    return changed


# --- loss -------------------------------------------------------------------------------------

def fair_loss(model: Any, batch: dict[str, torch.Tensor], cfg: FairFinetuneConfig) -> tuple[torch.Tensor, dict]:
    """Task cross-entropy + adversary (through the GRL) + lambda-weighted attribute, DP and EO terms.

    Returns the total and its terms as floats (soft DP/EO gaps are reported even when off).
    """
    out = model(batch)
    y, g = batch["labels"], batch["groups"]
    task = F.cross_entropy(out["logits"], y)
    total, terms = task, {"task": float(task.detach())}
    if "adv_logits" in out:
        adv = F.cross_entropy(out["adv_logits"], g)
        total = total + adv
        terms["adv"] = float(adv.detach())
        terms["adv_acc"] = float((out["adv_logits"].argmax(-1) == g).float().mean())
    if "attr_logits" in out:
        attr = F.cross_entropy(out["attr_logits"], g)
        total = total + cfg.lambda_attr * attr
        terms["attr"] = float(attr.detach())
    probs = out["logits"].softmax(-1)
    for name, lam, fn in (("dp", cfg.lambda_dp, lambda p: dp_gap(p, g, cfg.gap_reduction)),
                          ("eo", cfg.lambda_eo, lambda p: eo_gap(p, y, g, cfg.gap_reduction))):
        term = fn(probs if lam > 0 else probs.detach())
        if lam > 0:
            total = total + lam * term
        terms[name] = float(term.detach())
    terms["total"] = float(total.detach())
    return total, terms


# --- prediction -------------------------------------------------------------------------------

@torch.no_grad()
def predict(fe: FairEncoder, examples: Sequence[Any], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Task-head logits [N, C] and pooled (not normalised) embeddings [N, d], in eval mode."""
    was = fe.training
    fe.eval()
    device = next(fe.parameters()).device
    logits, embs = [], []
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in fe.collate(examples[i:i + batch_size], targets=False).items()}
            out = fe(batch)
            logits.append(out["logits"].float().cpu())
            embs.append(out["embedding"].float().cpu())
    finally:
        fe.train(was)
    if not logits:
        return np.zeros((0, len(fe.classes)), np.float32), np.zeros((0, fe.dim), np.float32)
    return torch.cat(logits).numpy(), torch.cat(embs).numpy()


def validation_metrics(fe: FairEncoder, examples: Sequence[Any], batch_size: int = 64) -> dict[str, float]:
    """val_loss, val_accuracy, val_macro_f1 and the hard one-vs-rest gaps (val_tpr_gap, val_eo_gap, val_dp_gap)."""
    logits, _ = predict(fe, examples, batch_size)
    known = np.array([e.label in fe._class_index for e in examples], bool)
    y = np.array([fe._class_index.get(e.label, -1) for e in examples])
    pred = logits.argmax(-1) if len(logits) else np.zeros(0, int)
    if not known.any():
        return {k: math.nan for k in ("val_loss", "val_accuracy", "val_macro_f1", "val_tpr_gap", "val_eo_gap",
                                      "val_dp_gap")}
    loss = float(F.cross_entropy(torch.from_numpy(logits[known]), torch.from_numpy(y[known])))
    groups = np.array([str(e.groups.get(fe.attribute)) for e in examples])
    gaps = ovr_gaps(y[known], pred[known], groups[known])
    return {"val_loss": loss, "val_accuracy": float((pred[known] == y[known]).mean()),
            "val_macro_f1": float(f1_score(y[known], pred[known], labels=list(range(len(fe.classes))),
                                           average="macro", zero_division=0)),
            **{f"val_{k}": v for k, v in gaps.items()}}


# --- training ---------------------------------------------------------------------------------

@dataclass
class FairTrainResult:
    """The trained FairEncoder (last epoch's weights), the per-epoch history and where it was written."""

    model: FairEncoder
    history: list[dict]
    directory: Path | None
    steps_per_epoch: int
    stopped_early: bool
    stop_reason: str
    seconds: float
    n_trainable: int


class _Epochs:
    """on_step at epoch boundaries: validate, checkpoint, write the history, decide early stopping."""

    def __init__(self, val: Sequence[Any] | None, cfg: FairFinetuneConfig, directory: Path | None, spe: int):
        self.val, self.cfg, self.dir, self.spe = val, cfg, directory, spe
        self.terms: list[dict] = []
        self.history: list[dict] = []
        self.best, self.bad, self.stop_reason = None, 0, ""
        self.t0 = time.time()

    def __call__(self, step: int, fe: FairEncoder) -> bool:
        if step % self.spe:
            return False
        epoch = step // self.spe
        done, self.terms = self.terms, []
        keys = sorted({k for t in done for k in t})
        row: dict[str, Any] = {"epoch": epoch, "step": step}
        row.update({f"train_{k}": float(np.mean([t[k] for t in done if k in t])) for k in keys})
        if self.val:
            row.update(validation_metrics(fe, self.val, self.cfg.eval_batch_size))
        row["seconds"] = round(time.time() - self.t0, 3)
        if self.dir is not None:
            ckpt = Path("checkpoints") / f"epoch-{epoch:03d}.safetensors"
            atomic_write_bytes(self.dir / ckpt, st_save(fe.trainable_state()))
            row["checkpoint"] = str(ckpt)
        self.history.append(row)
        stop = self._early_stop(row)
        if self.dir is not None:
            self.write(fe)
        return stop

    def _early_stop(self, row: dict) -> bool:
        value = row.get(self.cfg.monitor, math.nan)
        if not self.cfg.patience or value is None or math.isnan(value):
            return False
        score = -value if self.cfg.monitor == "val_loss" else value
        if self.best is None or score > self.best + self.cfg.min_delta:
            self.best, self.bad = score, 0
            return False
        self.bad += 1
        if self.bad >= self.cfg.patience:
            self.stop_reason = f"{self.cfg.monitor} did not improve for {self.bad} epochs (patience {self.cfg.patience})"
            return True
        return False

    def write(self, fe: FairEncoder) -> None:
        atomic_write_csv(self.dir / "epoch_metrics.csv", self.history)
        atomic_write_json(self.dir / "training_history.json", {
            "format": "excise.fair_finetune/1", "config": self.cfg.model_dump(mode="json"),
            "attribute": fe.attribute, "classes": fe.classes, "group_values": fe.group_values,
            "steps_per_epoch": self.spe, "stopped_early": bool(self.stop_reason), "stop_reason": self.stop_reason,
            **summary(self.history, self.cfg.utility_metric, self.cfg.fairness_metric), "epochs": self.history})


def fair_finetune(handle: Any, train_examples: Sequence[Any], val_examples: Sequence[Any] | None = None,
                  cfg: FairFinetuneConfig | None = None, *, directory: str | Path | None = None,
                  classes: Sequence[Any] | None = None, progress: bool = False) -> FairTrainResult:
    """Fine-tune a FairEncoder on ``train_examples`` (see the module doc); ``handle`` is not modified.

    With ``directory``: per-epoch checkpoints, ``epoch_metrics.csv`` and ``training_history.json``
    are written there. Without ``val_examples`` there is no validation and no early stopping.
    ``classes``: see :func:`build_fair_encoder`.
    """
    cfg = cfg or FairFinetuneConfig()
    fe = build_fair_encoder(handle, train_examples, cfg, classes=classes)
    spe = math.ceil(len(train_examples) / cfg.batch_size)
    steps = spe * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.06 * steps)
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_steps=warmup, schedule="linear", max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
    out_dir = Path(directory) if directory is not None else None
    epochs = _Epochs(val_examples, cfg, out_dir, spe)

    def loss_fn(model: Any, batch: dict) -> torch.Tensor:
        total, terms = fair_loss(model, batch, cfg)
        epochs.terms.append(terms)
        return total

    data = Examples(train_examples, cfg.batch_size, collate=fe.collate, seed=cfg.seed)
    res = train(fe, data, loss_fn, tcfg, on_step=epochs, progress=progress, desc="fair-finetune")
    return FairTrainResult(model=res.model, history=epochs.history, directory=out_dir, steps_per_epoch=spe,
                           stopped_early=res.stopped_early, stop_reason=epochs.stop_reason, seconds=res.seconds,
                           n_trainable=res.n_trainable)


__all__ = ["FairEncoder", "FairFinetuneConfig", "FairTrainResult", "build_fair_encoder", "changed_base_weights",
           "embed", "fair_finetune", "fair_loss", "lora_fields", "pool", "predict", "validation_metrics"]
