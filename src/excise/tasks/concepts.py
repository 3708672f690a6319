"""Concept specs: what to forget, how it leaks, what to keep (YAML or JSON, user-writable).

A spec names one concept and lists, as prompt/answer items:

* ``forget``: direct questions with the answer that reveals the concept (the training data);
* ``forget_eval``: more direct questions, held out from training (the direct leak probes; empty:
  the concept recipe holds out half of ``forget``, see :func:`split_heldout`);
* ``paraphrases``: the same questions reworded (held out from training);
* ``adversarial``: probes by ``family`` -- indirect descriptions, completion prompts, role-play,
  another language, the answer asked for in pieces (held out);
* ``retain``: neighbouring and unrelated facts with their expected answers (evaluation);
* ``retain_train``: facts for the retain term of training, disjoint from ``retain`` (empty: the
  recipe trains on half of ``retain`` and evaluates on the other half);
* ``neutral``: plain passages for perplexity.

``leak_patterns`` are case-insensitive regexes; a generation leaks if it matches one of them, the
item's own answer or aliases, or the item's extra ``leak`` patterns -- except patterns already
present in the prompt (echoing the question is not a leak). Answers and aliases match as whole
words (``4`` does not leak in ``14``); ``leak_patterns`` and ``leak`` stay as written. A retain
generation is correct if it contains the answer or an alias as whole words (:func:`answer_in`).
Loading validates with pydantic and fails with one line naming file:line:field.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from excise.config import load_yaml, validate
from excise.errors import ExciseError
from excise.io import read_json
from excise.models.load import add_special_tokens_for

FAMILIES = ("indirect", "completion", "roleplay", "language", "pieces", "other")
PACKAGED = Path(__file__).resolve().parent.parent / "data" / "concepts"


# --- whole-answer matching ---------------------------------------------------------------------
# Scripts written without spaces: each character is a token (and gets no word boundary).
_NOSPACE = "\u0e00-\u0e7f\u2e80-\u2fdf\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_NOSPACE}]|(?:\d+(?:[.,]\d+)*|(?![{_NOSPACE}])[^\W\d_])+")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")


def _number(tok: str) -> str:
    """``1,000`` -> ``1000``, ``4.50`` -> ``4.5``, ``007`` -> ``7``; other digit groups (``3.1.2``, ``4,5``) stay as written."""
    if _THOUSANDS.fullmatch(tok):
        tok = tok.replace(",", "")
    if _DECIMAL.fullmatch(tok):
        try:
            return format(Decimal(tok).normalize(), "f")
        except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
            return tok
    return tok


def answer_tokens(text: str) -> list[str]:
    """Normalised tokens: NFKC, case-folded; runs of letters and digits (``4th``, ``b2``, ``4.5``: one token
    each), punctuation and whitespace dropped; a number token compares as a number (:func:`_number`)."""
    return [_number(t) for t in _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())]


def answer_in(answer: str, text: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as whole tokens, contiguous and in order (:func:`answer_tokens`).

    So ``0`` is not in ``100``, ``4`` is not in ``14``, ``4.5`` nor ``4th``, ``1,000`` is ``1000``, ``Steven
    Spielberg`` is in ``"steven  spielberg's"``. An answer without letters or digits falls back to a
    case-folded substring match.
    """
    a = answer_tokens(answer)
    if not a:
        fold = lambda x: unicodedata.normalize("NFKC", x).casefold()  # noqa: E731
        return bool(answer.strip()) and fold(answer.strip()) in fold(text)
    t = answer_tokens(text)
    return any(t[i:i + len(a)] == a for i in range(len(t) - len(a) + 1))


def answer_regex(answer: str) -> str:
    """A regex for ``answer`` as whole words: any whitespace between its words, no word character (nor a
    decimal part, for a number) glued on either side; scripts without spaces get no boundary."""
    words = answer.split()
    if not words:
        return re.escape(answer)
    body = r"\s+".join(re.escape(w) for w in words)
    first, last = words[0][0], words[-1][-1]
    lead = "" if re.match(rf"[{_NOSPACE}]", first) or not re.match(r"\w", first) else r"(?<!\w)"
    trail = "" if re.match(rf"[{_NOSPACE}]", last) or not re.match(r"\w", last) else r"(?!\w)"
    if first.isdigit():
        lead += r"(?<!\d[.,])"
    if last.isdigit():
        trail += r"(?![.,]\d)"
    return lead + body + trail


# --- held-out splits ---------------------------------------------------------------------------

def _rank(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big")


def split_heldout(items: Sequence[Any], seed: int, fraction: float = 0.5,
                  key: Callable[[Any], str] = lambda it: it.prompt) -> tuple[list, list]:
    """Deterministic (training, held-out) split of ``items``: the ``round(fraction * n)`` distinct keys
    (prompts) with the smallest seeded hash are held out -- at least one and at most n - 1 when there
    are two or more, so neither side is empty; items sharing a prompt stay on one side. Order is kept."""
    keys = list(dict.fromkeys(key(it) for it in items))
    if len(keys) < 2:
        return list(items), []
    n_held = min(max(round(fraction * len(keys)), 1), len(keys) - 1)
    held = set(sorted(keys, key=lambda k: (_rank(k, seed), k))[:n_held])
    return [it for it in items if key(it) not in held], [it for it in items if key(it) in held]


class ConceptItem(BaseModel):
    """One prompt and the answer that reveals the concept (forget/probes) or is expected (retain)."""

    model_config = {"extra": "forbid"}
    prompt: str = Field(..., min_length=1, description="the question or completion prompt, as the user would type it")
    answer: str = Field(..., min_length=1, description="short answer string; its presence in a generation, as whole words, counts as correct (retain) or as a leak (forget/probes)")
    aliases: list[str] = Field(default_factory=list, description="other strings that count as the answer")
    response: str | None = Field(None, description="full target response for teacher forcing and training (default: the answer; completion prompts get a leading space)")
    format: Literal["chat", "completion"] = Field("chat", description="chat: wrapped in the model's chat template; completion: raw text continued by the model")
    family: Literal["indirect", "completion", "roleplay", "language", "pieces", "other"] | None = Field(
        None, description="adversarial probe family (adversarial items only)")
    leak: list[str] = Field(default_factory=list, description="extra leak regexes for this item only (e.g. 'Christopher' for a first-name probe)")
    group: str | None = Field(None, description="retain items: a group for per-group accuracy (e.g. neighbour, unrelated)")

    def target(self) -> str:
        """The teacher-forced response text."""
        if self.response is not None:
            return self.response
        return (" " + self.answer) if self.format == "completion" else self.answer


class ConceptSpec(BaseModel):
    """A concept to unlearn, its probes, leak patterns and what must be retained."""

    model_config = {"extra": "forbid"}
    name: str = Field(..., min_length=1, description="the concept's name (e.g. Inception)")
    description: str = Field("", description="free text: what the concept is")
    leak_patterns: list[str] = Field(..., min_length=1, description="case-insensitive regexes whose presence in a generation reveals the concept")
    forget: list[ConceptItem] = Field(..., min_length=1, description="direct questions with revealing answers (training data)")
    forget_eval: list[ConceptItem] = Field(
        default_factory=list, description="direct questions held out from training (the direct leak probes); "
                                          "empty: the recipe holds out half of forget")
    paraphrases: list[ConceptItem] = Field(default_factory=list, description="reworded direct questions (held out)")
    adversarial: list[ConceptItem] = Field(default_factory=list, description="held-out probes, each with a family")
    retain: list[ConceptItem] = Field(..., min_length=1, description="neighbouring and unrelated facts with expected answers")
    retain_train: list[ConceptItem] = Field(
        default_factory=list, description="prompts + responses for localization's contrast and the retain term of training "
                                          "(KL to the base model); "
                                          "kept apart from `retain` so retain accuracy is measured out of sample (empty: the recipe "
                                          "trains on half of `retain` and evaluates on the other half)")
    neutral: list[str] = Field(default_factory=list, description="neutral passages for perplexity")
    refusal: str = Field("I don't know.", min_length=1, description="replacement target of the 'idk' objective")

    @field_validator("leak_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {i} is not a valid regex ({e})") from None
        return v

    @field_validator("forget_eval", "retain_train")
    @classmethod
    def _disjoint(cls, v: list[ConceptItem], info: ValidationInfo) -> list[ConceptItem]:
        other = {"forget_eval": "forget", "retain_train": "retain"}[info.field_name]
        both = {it.prompt for it in v} & {it.prompt for it in info.data.get(other) or []}
        if both:
            raise ValueError(f"shares {len(both)} prompt(s) with {other} (e.g. {sorted(both)[0]!r}): "
                             "an item must not be both trained on and evaluated")
        return v

    @field_validator("adversarial")
    @classmethod
    def _families(cls, v: list[ConceptItem]) -> list[ConceptItem]:
        for i, it in enumerate(v):
            if it.family is None:
                raise ValueError(f"item {i} has no family (one of {', '.join(FAMILIES)})")
        return v

    # --- sets ------------------------------------------------------------------------------
    def probe_sets(self) -> dict[str, list[ConceptItem]]:
        """Probe families for leak measures: direct, paraphrase and one per adversarial family.

        ``direct`` is ``forget_eval`` when the spec has it (held out from training), else ``forget``
        (in sample: the concept recipe always fills ``forget_eval`` in its screen stage)."""
        out: dict[str, list[ConceptItem]] = {"direct": list(self.forget_eval or self.forget),
                                             "paraphrase": list(self.paraphrases)}
        for it in self.adversarial:
            out.setdefault(f"adv_{it.family}", []).append(it)
        return {k: v for k, v in out.items() if v}

    def leak_regexes(self, item: ConceptItem) -> list[re.Pattern]:
        """Patterns that reveal the concept for this item, minus those the prompt already contains."""
        pats = list(self.leak_patterns) + [answer_regex(a) for a in [item.answer, *item.aliases]] + list(item.leak)
        out = []
        for p in dict.fromkeys(pats):
            rx = re.compile(p, re.IGNORECASE)
            if not rx.search(item.prompt):
                out.append(rx)
        return out

    def leaks(self, item: ConceptItem, generation: str) -> bool:
        return any(rx.search(generation) for rx in self.leak_regexes(item))

    @staticmethod
    def correct(item: ConceptItem, generation: str) -> bool:
        """The generation contains the answer or an alias as whole words (:func:`answer_in`)."""
        return any(answer_in(a, generation) for a in [item.answer, *item.aliases])

    def filtered(self, keep: dict[str, list[bool]]) -> "ConceptSpec":
        """A copy keeping only flagged items of ``forget``/``forget_eval``/``paraphrases``/``adversarial``/``retain``."""
        upd = {}
        for key in ("forget", "forget_eval", "paraphrases", "adversarial", "retain"):
            if key in keep:
                items = getattr(self, key)
                if len(keep[key]) != len(items):
                    raise ExciseError(f"filter for '{key}' has {len(keep[key])} flags for {len(items)} items")
                upd[key] = [it for it, k in zip(items, keep[key]) if k]
        return self.model_copy(update=upd)


def format_prompt(handle: Any, item: ConceptItem) -> str:
    """The text fed to the model: chat template for chat items, raw text for completions."""
    return handle.chat(item.prompt) if item.format == "chat" else item.prompt


def load_concept(path: str | Path) -> ConceptSpec:
    """Load and validate a spec (YAML or JSON); a packaged name such as ``inception`` also works."""
    p = Path(path)
    if not p.exists():
        for cand in (PACKAGED / p.name, PACKAGED / f"{p.name}.yaml"):
            if cand.exists():
                p = cand
                break
        else:
            packaged = ", ".join(sorted(x.stem for x in PACKAGED.glob("*.yaml")))
            raise ExciseError(f"concept spec not found (packaged: {packaged})", where=str(path))
    if p.suffix == ".json":
        data = read_json(p)
    else:
        data = load_yaml(p)  # JSON is YAML too
    return validate(ConceptSpec, data, p)


def packaged_concept(name: str = "inception") -> Path:
    return PACKAGED / f"{name}.yaml"


def encode_items(handle: Any, items: Sequence[ConceptItem], responses: Sequence[str] | None = None) -> dict:
    """Right-padded teacher-forcing batch: prompt + response, labels only on the response tokens.

    Token ids of prompt and response are concatenated (not re-tokenized together), so the
    labelled span is exactly the response whatever the tokenizer does at the boundary.
    """
    import torch

    tok = handle.tokenizer
    seqs, labs = [], []
    for i, it in enumerate(items):
        prompt = format_prompt(handle, it)
        specials = add_special_tokens_for([prompt])
        p_ids = list(tok.encode(prompt, add_special_tokens=specials))
        r_ids = list(tok.encode(responses[i] if responses is not None else it.target(), add_special_tokens=False))
        if not r_ids:
            raise ExciseError(f"item {i} has an empty response", where=it.prompt[:40])
        seqs.append(p_ids + r_ids)
        labs.append([-100] * len(p_ids) + r_ids)
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    dev = handle.device
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}
