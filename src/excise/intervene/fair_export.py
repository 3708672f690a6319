"""Restore a fair fine-tuning epoch, export the adapter + heads with a model card, load an export back.

An export directory holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the peft LoRA adapter
  (``save_pretrained``), so ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), dir)``
  gives exactly the fine-tuned encoder (pool its last hidden states as ``fair_encoder.json`` says);
* ``heads.safetensors``: the task head (and the adversary / attribute head when trained);
* ``fair_encoder.json``: base model, classes, protected attribute and its values, pooling, the
  training config;
* ``README.md``: a model card stating the data, the metrics and the limits.

The directory is built aside and moved into place (``excise.io.atomic_dir``): a failed export
leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from peft import PeftModel
from safetensors.torch import load_file, save_file

from excise.errors import ExciseError
from excise.intervene.fair_finetune import FairEncoder, FairFinetuneConfig
from excise.io import atomic_dir, atomic_write_json, read_json
from excise.models import load

META = "fair_encoder.json"
HEADS = "heads.safetensors"
LIMITS = (
    "Fairness was measured for one protected attribute, on the validation and test data named above; it does not "
    "transfer to other attributes, groups, languages or domains without measuring again.",
    "Group labels in the training data may be noisy or inferred (e.g. gender from pronouns), and non-binary or "
    "unlisted groups are not represented by a two-valued attribute.",
    "A smaller gap between groups on average can hide larger gaps for single classes or intersections of groups.",
    "The adversary and the parity terms act on the training distribution; a shift in base rates changes the gaps.",
)


def load_epoch(fe: FairEncoder, directory: str | Path, epoch: int) -> FairEncoder:
    """Load epoch ``epoch``'s adapter and heads (``checkpoints/epoch-NNN.safetensors``) into ``fe`` in place."""
    path = Path(directory) / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
    if not path.exists():
        raise ExciseError(f"no checkpoint for epoch {epoch}", where=str(path))
    _load_into(fe, load_file(str(path)), str(path))
    return fe


def _load_into(fe: FairEncoder, state: Mapping[str, Any], where: str, expected: list[str] | None = None) -> None:
    """Load ``state`` into ``fe``; it must hold exactly ``expected`` (default: the trainable tensors)."""
    own = dict(fe.named_parameters())
    if expected is None:
        expected = [n for n, p in own.items() if p.requires_grad]
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise ExciseError(f"checkpoint does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}", where=where)
    device = next(fe.parameters()).device
    fe.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)


def _head_state(fe: FairEncoder) -> dict[str, Any]:
    return {n: p.detach().cpu().contiguous() for n, p in fe.named_parameters() if not n.startswith("encoder.")}


def _table(rows: Mapping[str, Any]) -> str:
    def flat(d: Mapping[str, Any], pre: str = "") -> list[tuple[str, Any]]:
        out = []
        for k, v in d.items():
            out += flat(v, f"{pre}{k}.") if isinstance(v, Mapping) else [(f"{pre}{k}", v)]
        return out

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "undefined"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {cell(v)} |" for k, v in flat(rows))])


def model_card(fe: FairEncoder, base_name: str, card: Mapping[str, Any]) -> str:
    """The README.md of an export: front matter for the hub, usage, training settings, data, metrics, limits."""
    for key in ("data", "metrics"):
        if not card.get(key):
            raise ExciseError(f"the model card needs '{key}' (what the adapter was trained and measured on)")
    cfg = fe.cfg
    data = card["data"]
    data_txt = _table(data) if isinstance(data, Mapping) else str(data)
    metrics = card["metrics"]
    metrics_txt = _table(metrics) if isinstance(metrics, Mapping) else str(metrics)
    limits = card.get("limits") or []
    limits = [limits] if isinstance(limits, str) else list(limits)
    terms = {k: getattr(cfg, k) for k in ("lambda_adv", "lambda_attr", "lambda_dp", "lambda_eo") if getattr(cfg, k)}
    targets = fe.encoder.peft_config["default"].target_modules
    lora = {**cfg.lora.model_dump(exclude_none=True), "target_modules": ", ".join(sorted(targets or []))}
    settings = {"lora": lora, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "pooling": cfg.pooling, "max_length": cfg.max_length, "seed": cfg.seed,
                "fairness terms": terms or "none (plain LoRA)"}
    extra = {k: v for k, v in card.items() if k not in ("data", "metrics", "limits", "title", "selection")}
    lines = [
        "---", "library_name: peft", f"base_model: {base_name}", "tags:", "- excise", "- fairness", "- lora",
        "- text-classification", "---", "",
        f"# {card.get('title') or 'Fair encoder adapter for ' + base_name}", "",
        f"A LoRA adapter for `{base_name}` fine-tuned with `excise.intervene.fair_finetune` to classify into "
        f"{len(fe.classes)} classes while keeping predictions fair across `{fe.attribute}` "
        f"({', '.join(map(str, fe.group_values))}).", "",
        "## Usage", "", "```python", "from peft import PeftModel", "from transformers import AutoModel, AutoTokenizer",
        "", f'base = AutoModel.from_pretrained("{base_name}")', 'model = PeftModel.from_pretrained(base, "THIS_DIR")',
        f'tok = AutoTokenizer.from_pretrained("{base_name}")',
        f"# embeddings: {cfg.pooling} pooling of last_hidden_state over the attention mask",
        "```", "", "With excise: `excise.intervene.fair_export.load_exported(dir)` also restores the task head "
        f"(`{HEADS}`; classes in `{META}`).", "",
        "## Training", "", _table(settings), "",
    ]
    if card.get("selection"):
        lines += [f"Checkpoint: {card['selection']}", ""]
    lines += ["## Data", "", data_txt, "", "## Metrics", "", metrics_txt, "", "## Limits", "",
              *(f"- {x}" for x in [*limits, *LIMITS]), ""]
    if extra:
        lines += ["## Other", "", _table(extra), ""]
    return "\n".join(lines)


def export(fe: FairEncoder, directory: str | Path, *, base_name: str, card: Mapping[str, Any]) -> Path:
    """Write the peft adapter, the heads, ``fair_encoder.json`` and a model card to ``directory`` (atomically)."""
    text = model_card(fe, base_name, card)
    pcfg = fe.encoder.peft_config["default"]
    old = pcfg.base_model_name_or_path
    with atomic_dir(directory) as tmp:
        pcfg.base_model_name_or_path = base_name
        try:
            fe.encoder.save_pretrained(str(tmp))
        finally:
            pcfg.base_model_name_or_path = old
        save_file(_head_state(fe), str(tmp / HEADS))
        atomic_write_json(tmp / META, {
            "format": "excise.fair_encoder/1", "base_name": base_name, "classes": fe.classes,
            "attribute": fe.attribute, "group_values": fe.group_values, "pooling": fe.cfg.pooling,
            "dim": fe.dim, "config": fe.cfg.model_dump(mode="json")})
        (tmp / "README.md").write_text(text, encoding="utf-8")
    return Path(directory)


def load_exported(directory: str | Path, *, base: str | None = None, device: str = "cpu") -> FairEncoder:
    """A FairEncoder (eval mode, frozen) from an export; ``base`` overrides the recorded base model."""
    directory = Path(directory)
    meta = read_json(directory / META)
    handle = load(base or meta["base_name"], kind="encoder", device=device)
    peft_model = PeftModel.from_pretrained(handle.model, str(directory))
    cfg = FairFinetuneConfig(**meta["config"])
    fe = FairEncoder(peft_model, handle.tokenizer, meta["classes"], meta["group_values"], meta["attribute"], cfg)
    fe.to(device)
    heads = load_file(str(directory / HEADS))
    _load_into(fe, heads, str(directory / HEADS), expected=list(_head_state(fe)))
    for p in fe.parameters():
        p.requires_grad_(False)
    return fe.eval()


__all__ = ["export", "load_epoch", "load_exported", "model_card"]
