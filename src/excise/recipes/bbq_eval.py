"""BBQ evaluation: :func:`predict` (items -> prediction rows, through :mod:`excise.lm`), the
`excise bbq eval` stages (:func:`run_eval`) and `excise bbq score` for predictions from any
source (:func:`run_score`, :func:`read_predictions`).

Scoring modes, all batched (prompts and options: :mod:`excise.tasks.bbq_prompts`):

* ``loglik``: log-likelihood of each answer option after the prompt (:func:`excise.lm.loglikelihood`,
  packed prefix-tree path where the model allows it);
* ``letter``: the lettered question through the chat template; the next-token log-probabilities
  of "A"/"B"/"C" pick the answer (:func:`excise.lm.next_token_logprobs`). Small models have
  position bias, so letter counts are reported;
* ``generate``: greedy free text (:func:`excise.lm.generate`), mapped to an option like the BBQ
  authors' script does (:func:`excise.tasks.bbq_prompts.match_answer`); unmapped answers are
  counted and reported.

Metrics: :func:`excise.measure.bbq.bias_scores`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import AfterValidator, BaseModel, Field
from tqdm.auto import tqdm

from excise import lm
from excise.config import Device
from excise.errors import ExciseError, where
from excise.io import atomic_dir, atomic_write_json, atomic_write_jsonl, check_out_dir, iter_jsonl
from excise.measure.bbq import BiasReport, GroupScores, bias_scores
from excise.models import load
from excise.resume import Points, chunked
from excise.run import Run, seed_everything
from excise.tasks.bbq import (CATEGORIES, METADATA_FILE, check_category_list, load_bbq, load_bbq_hf, load_jsonl,
                              packaged_bbq_dir, parse_row, sample_bbq)
from excise.tasks.bbq_items import BBQItem, attach_targets, find_templates_dir, norm_question_index
from excise.tasks.bbq_prompts import LETTERS, letter_prompt, letter_token_ids, loglik_requests, match_answer

# predictions are made, and kept for a resumed run, in chunks of this many batches (the same chunks
# fresh or resumed, so a resumed run writes the same bytes; excise.resume)
CHUNK_BATCHES = 8
Mode = Literal["loglik", "letter", "generate"]
MODES = ("loglik", "letter", "generate")
TEXT_FIELDS = ("prediction", "answer", "response", "output", "pred_text")


# ============================================================================ predict

def predict(
    handle: Any,
    items: Sequence[BBQItem],
    mode: Mode = "loglik",
    *,
    batch_size: int = 8,
    normalize: lm.Normalize = "none",
    max_new_tokens: int = 24,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score items and return one row per item: the BBQ fields, ``pred`` (0-2, or None when a
    generated answer maps to no option), ``correct``, and the mode's evidence (``scores`` for
    loglik/letter, ``response``/``match`` for generate)."""
    if mode not in MODES:
        raise ExciseError(f"unknown scoring mode '{mode}'; choose one of {', '.join(MODES)}")
    rows: list[dict[str, Any]] = []
    if mode in ("loglik", "letter"):
        if mode == "loglik":
            res = lm.loglikelihood(handle, loglik_requests(items), batch_size=batch_size, normalize=normalize,
                                   progress=progress)
            scores = np.stack(res) if res else np.zeros((0, 3))
        else:
            scores = lm.next_token_logprobs(handle, [letter_prompt(handle, x) for x in items],
                                            letter_token_ids(handle.tokenizer), batch_size=batch_size,
                                            progress=progress)
        for x, s in zip(items, scores):
            pred = int(np.argmax(s))  # ties: the first option, deterministically
            rows.append(prediction_row(x, pred, mode, scores=[float(v) for v in s]))
    else:
        texts = lm.generate(handle, [letter_prompt(handle, x) for x in items], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress)
        for x, t in zip(items, texts):
            t = t.strip()
            pred, how = match_answer(t, x)
            rows.append(prediction_row(x, pred, mode, response=t, match=how))
    return rows


def prediction_row(x: BBQItem, pred: int | None, mode: str, **extra: Any) -> dict[str, Any]:
    """The item's BBQ fields plus ``pred``, ``correct`` (None when unmatched), ``scoring`` and ``extra``."""
    r = x.fields()
    r.update(pred=pred, correct=None if pred is None else int(pred == x.label), scoring=mode, **extra)
    return r


def save_predictions(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    return atomic_write_jsonl(path, rows)


# ============================================================================ `excise bbq eval`

class BBQEvalConfig(BaseModel):
    """Settings of `excise bbq eval` (defaults: all categories, 50 items each, loglik scoring)."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory or hub id")
    categories: Annotated[list[str], AfterValidator(check_category_list)] = Field(
        default_factory=lambda: list(CATEGORIES), description="BBQ categories (all 11 by default)")
    per_category: int | None = Field(50, ge=1, description="items per category, stratified over context "
                                     "condition x question polarity; null = every item")
    scoring: Literal["loglik", "letter", "generate"] = Field("loglik", description="scoring mode")
    normalize: Literal["none", "tokens", "chars"] = Field(
        "none", description="loglik length normalisation (none = summed log-likelihood, as lm-eval's acc)")
    seed: int = Field(0, description="seed for sampling and bootstrap")
    batch_size: int = Field(8, ge=1, description="items per forward pass")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples for the bias-score CIs")
    max_new_tokens: int = Field(24, ge=1, description="generate mode: answer length cap")
    data_dir: str | None = Field(None, description="directory of <Category>.jsonl (default: packaged copy)")
    hf_dataset: str | None = Field(None, description="Hugging Face dataset id or local path instead of data_dir")
    hf_split: str | None = Field(None, description="split of hf_dataset (default: all splits)")
    hf_metadata: str | None = Field(None, description="additional_metadata.csv to join to hf_dataset rows "
                                    "(default: targets derived as the BBQ metadata script does)")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")


def load_items_for(cfg: Any) -> list[BBQItem]:
    """The configured BBQ source, stratified-sampled with the config's seed."""
    if cfg.hf_dataset:
        items = load_bbq_hf(cfg.hf_dataset, split=cfg.hf_split, categories=cfg.categories, metadata=cfg.hf_metadata)
    else:
        items = load_bbq(cfg.categories, data_dir=cfg.data_dir)
    return sample_bbq(items, cfg.per_category, seed=cfg.seed)


def run_eval(cfg: Any, out: str | Path, *, force: bool = False, console: Any = None, handle: Any = None) -> dict:
    """`excise bbq eval`: stages ``data`` (sampled items), ``predict`` (predictions.jsonl, throughput)
    and ``scores`` (bias_scores.json/.csv/.txt/.png). A re-run resumes finished stages."""
    seed_everything(cfg.seed)
    run = Run(out, {"workflow": "bbq-eval", **cfg.model_dump()}, force=force)
    # everything that can be wrong with the input is found before the first write: data, then model
    fresh = None
    if not run.is_done("data"):
        fresh = load_items_for(cfg)
        if not fresh:
            raise ExciseError("no BBQ items selected; check --categories and the data source")
    if not run.is_done("predict") and handle is None:
        handle = load(cfg.model, dtype=cfg.dtype, device=cfg.device)

    def data_stage(d: Path) -> dict:
        items = fresh
        atomic_write_jsonl(d / "items.jsonl", [x.fields() for x in items])
        cells: dict[str, int] = {}
        for x in items:
            k = f"{x.category}/{x.context_condition}/{x.question_polarity}"
            cells[k] = cells.get(k, 0) + 1
        src: dict[str, int] = {}
        for x in items:
            src[x.target_source or "none"] = src.get(x.target_source or "none", 0) + 1
        return {"n_items": len(items), "cells": cells, "target_sources": src}

    run.stage("data", data_stage)
    items = load_jsonl(run.stage_dir("data") / "items.jsonl")

    def predict_stage(d: Path) -> dict:
        h = handle
        t0, todo = time.time(), []
        with tqdm(total=len(items), desc=cfg.scoring, unit="item", leave=False, disable=console is None) as bar:
            def part(xs: Sequence[BBQItem]) -> list[dict]:
                todo.append(len(xs))
                return predict(h, xs, cfg.scoring, batch_size=cfg.batch_size, normalize=cfg.normalize,
                               max_new_tokens=cfg.max_new_tokens)

            rows = chunked(Points(run.checkpoint_dir("predict")), items, cfg.batch_size * CHUNK_BATCHES, part,
                           lambda x: [x.category, x.example_id], on_chunk=bar.update)
        dt = max(time.time() - t0, 1e-9)
        save_predictions(d / "predictions.jsonl", rows)
        counts = {LETTERS[i]: sum(1 for r in rows if r["pred"] == i) for i in range(3)}
        m = {"n_items": len(rows), "seconds": round(dt, 3), "items_per_second": round(sum(todo) / dt, 3),
             "scoring": cfg.scoring, "pred_counts": counts,
             "n_unmatched": sum(1 for r in rows if r["pred"] is None), "device": str(h.device)}
        if cfg.scoring == "generate":
            how: dict[str, int] = {}
            for r in rows:
                how[r["match"]] = how.get(r["match"], 0) + 1
            m["match_methods"] = how
        return m

    pred = run.stage("predict", predict_stage)
    rows = [row for _, row in iter_jsonl(run.stage_dir("predict") / "predictions.jsonl")]

    def scores_stage(d: Path) -> dict:
        rep = bias_scores(rows, n_boot=cfg.n_boot, seed=cfg.seed)
        rep.save(d, title=f"{cfg.model}: BBQ bias scores ({cfg.scoring})")
        return _summary(rep)

    sc = run.stage("scores", scores_stage)
    text = (run.stage_dir("scores") / "bias_scores.txt").read_text(encoding="utf-8")
    if console is not None:
        console.print(text, markup=False, highlight=False)
    return {"dir": str(run.dir), "predict": pred.metrics, "scores": sc.metrics, "text": text,
            "skipped": pred.skipped and sc.skipped}


def _summary(rep: BiasReport) -> dict:
    o = rep.overall
    return {"overall": {m: getattr(o, m).as_dict() for m in GroupScores.METRICS}, "n_rows": rep.n_rows,
            "n_unmatched": rep.n_unmatched, "n_no_target": rep.n_no_target, "pred_counts": rep.pred_counts}


# ============================================================================ `excise bbq score`

def score_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The BBQ data `excise bbq score` checks rows against and takes targets from: ``data_dir`` (which
    must be a directory) or the packaged copy; None when there is no packaged copy."""
    if data_dir:
        d = Path(data_dir)
        if not d.is_dir():
            raise ExciseError("BBQ data directory not found (a directory of <Category>.jsonl files is expected)"
                              if not d.exists() else "not a directory (a directory of <Category>.jsonl files is expected)",
                              where=str(d))
        return d
    try:
        return packaged_bbq_dir()
    except ExciseError:
        return None


@functools.lru_cache(maxsize=16)
def _data_items(path_s: str, _mtime: int) -> dict[int, BBQItem]:
    out: dict[int, BBQItem] = {}
    for x in load_jsonl(path_s):
        out.setdefault(x.example_id, x)
    return out


def data_items(d: Path | None, category: str) -> dict[int, BBQItem] | None:
    """example_id -> the item of ``<d>/<category>.jsonl`` (cached per file and modification time);
    None when there is no such file."""
    if d is None:
        return None
    f = d / f"{category}.jsonl"
    if not f.is_file():
        return None
    f = f.resolve()
    return _data_items(str(f), f.stat().st_mtime_ns)


def check_against_data(item: BBQItem, row: dict, d: Path | None, path: Path, lineno: int) -> bool:
    """Check a prediction row against the BBQ data it claims to come from; returns whether the data
    lists it. The category must be a BBQ category. When ``<d>/<category>.jsonl`` exists, the row's
    example_id must be in it (rows carrying their own ``target_loc`` excepted: they are scored with
    it and counted as not in the data) and question_index, ans0-ans2, label, context_condition and
    question_polarity must agree with that item; a missing question_index is taken from it.
    Errors name ``file:line:field``."""
    if item.category not in CATEGORIES:
        raise ExciseError(f"unknown BBQ category {item.category!r}; expected one of {', '.join(CATEGORIES)}",
                          where=where(path, lineno, "category"))
    if row.get("question_index") is None:
        item.question_index = ""
    known = data_items(d, item.category)
    if known is None:
        return False
    c = known.get(item.example_id)
    hint = " (predictions on other BBQ-format data: pass --data-dir with that data)"
    if c is None:
        if item.target_source == "row":
            return False
        raise ExciseError(f"{item.category} example_id {item.example_id} is not in the BBQ data "
                          f"({d / (item.category + '.jsonl')}), so it has no known target{hint}",
                          where=where(path, lineno, "example_id"))
    qi = norm_question_index(item.question_index)
    if not qi:
        item.question_index = c.question_index
    elif qi != norm_question_index(c.question_index):
        raise ExciseError(f"question_index {item.question_index!r} disagrees with the BBQ data's "
                          f"{c.question_index!r} for {item.category} example_id {item.example_id} ({c.source}){hint}",
                          where=where(path, lineno, "question_index"))
    for i in range(3):
        if item.answers[i].strip() != c.answers[i].strip():
            raise ExciseError(f"{item.answers[i]!r} disagrees with the BBQ data's {c.answers[i]!r} for "
                              f"{item.category} example_id {item.example_id} ({c.source}){hint}",
                              where=where(path, lineno, f"ans{i}"))
    for f in ("label", "context_condition", "question_polarity"):
        if getattr(item, f) != getattr(c, f):
            raise ExciseError(f"{getattr(item, f)!r} disagrees with the BBQ data's {getattr(c, f)!r} for "
                              f"{item.category} example_id {item.example_id} ({c.source}){hint}",
                              where=where(path, lineno, f))
    return True


def read_predictions(path: str | Path, *, lenient: bool = True, data_dir: str | Path | None = None,
                     stats: dict | None = None) -> tuple[list[dict], dict]:
    """Read predictions from any source: rows with the official BBQ fields plus ``pred`` (an answer
    index 0-2) or a text answer in one of ``prediction``/``answer``/``response``/``output``/
    ``pred_text``, matched with :func:`excise.tasks.bbq_prompts.match_answer`.

    Rows are checked against the BBQ data (``data_dir``, else the packaged copy: the same source
    the targets come from; :func:`check_against_data`): the category must be a BBQ category; where
    the data has the category's ``<Category>.jsonl``, the example_id must be in it and
    question_index, answers, label, condition and polarity must agree, else an error names
    ``file:line:field``. Rows that carry their own ``target_loc`` (e.g. `excise bbq eval` output
    on other data) need a known category and, when the data lists their id, the same checks; an id
    the data does not list is scored with the row's target and counted (``stats["not_in_data"]``).
    Targets come from the row (``target_loc``), else the data's ``additional_metadata.csv`` (whose
    question_index must agree too) or the authors' derivation
    (:func:`excise.tasks.bbq_items.attach_targets`).
    Returns (rows ready for :func:`excise.measure.bbq.bias_scores`, counts by match method);
    ``stats``, if given, receives ``data`` (``data_dir``, "packaged", or None: nothing to check against),
    ``checked`` (rows found in it), ``not_in_data`` and ``unchecked`` (rows of a category the data
    has no file for: user data without it, or no packaged copy)."""
    path = Path(path)
    d = score_data_dir(data_dir)
    parsed: list[tuple[BBQItem, int | None, str, str | None]] = []
    n_checked = n_not_in_data = n_unchecked = 0
    for lineno, row in iter_jsonl(path):
        item = parse_row(row, path, lineno)
        if check_against_data(item, row, d, path, lineno):
            n_checked += 1
        elif data_items(d, item.category) is None:
            n_unchecked += 1  # no <Category>.jsonl to check against (user data without it, no packaged copy)
        else:
            n_not_in_data += 1  # a row with its own target_loc whose id the data does not list
        if "pred" in row and row["pred"] is not None:
            p = row["pred"]
            if isinstance(p, bool) or not isinstance(p, int) or p not in (0, 1, 2):
                raise ExciseError(f"expected an answer index 0, 1 or 2, got {p!r}", where=where(path, lineno, "pred"))
            parsed.append((item, p, "index", None))
            continue
        tf = next((k for k in TEXT_FIELDS if k in row and row[k] is not None), None)
        if tf is None:
            if "pred" in row:  # an explicit null: a prediction that did not map to an option
                parsed.append((item, None, "unmatched", None))
                continue
            raise ExciseError("missing field (an answer index 'pred' or a text answer: " + ", ".join(TEXT_FIELDS) + ")",
                              where=where(path, lineno, "pred"))
        if not isinstance(row[tf], str):
            raise ExciseError("expected a string", where=where(path, lineno, tf))
        p, how = match_answer(row[tf], item, lenient=lenient)
        parsed.append((item, p, how, row[tf]))
    items = [x for x, *_ in parsed]
    # always: the metadata's question_index is checked for every row, not only those without a target
    attach_targets(items, metadata=(d / METADATA_FILE) if d else None, templates=find_templates_dir(d) if d else None)
    rows, how_counts = [], {}
    for item, p, how, text in parsed:
        extra: dict[str, Any] = {"match": how}
        if text is not None:
            extra["response"] = text
        rows.append(prediction_row(item, p, "external", **extra))
        how_counts[how] = how_counts.get(how, 0) + 1
    if stats is not None:
        stats.update(data=None if d is None else (str(data_dir) if data_dir else "packaged"), checked=n_checked,
                     not_in_data=n_not_in_data, unchecked=n_unchecked)
    return rows, how_counts


def run_score(predictions: str | Path, out: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
              lenient: bool = True, data_dir: str | Path | None = None, console: Any = None) -> dict:
    """`excise bbq score`: bias scores of a predictions JSONL, written atomically into ``out``. Rows are
    checked against the BBQ data first (:func:`read_predictions`): a row that is not the BBQ item it
    names is an error, not a silently mis-targeted score."""
    if n_boot < 10:
        raise ExciseError(f"--n-boot must be at least 10 for a 95% CI, got {n_boot}")
    out = Path(out) if out else Path(predictions).with_suffix("").with_name(Path(predictions).stem + "_scores")
    check_out_dir(out)
    stats: dict[str, Any] = {}
    rows, how = read_predictions(predictions, lenient=lenient, data_dir=data_dir, stats=stats)
    if not rows:
        raise ExciseError("no prediction rows", where=str(predictions))
    rep = bias_scores(rows, n_boot=n_boot, seed=seed)
    with atomic_dir(out) as tmp:
        rep.save(tmp, title=f"BBQ bias scores: {Path(predictions).name}")
        save_predictions(tmp / "matched_predictions.jsonl", rows)
        atomic_write_json(tmp / "match_counts.json", {"match_methods": how, "n_unmatched": rep.n_unmatched,
                                                       "n_rows": rep.n_rows, "lenient": lenient,
                                                       "checked_against": stats["data"],
                                                       "n_checked": stats["checked"],
                                                       "n_not_in_data": stats["not_in_data"],
                                                       "n_unchecked": stats["unchecked"]})
    text = rep.text() + "matched by: " + ", ".join(f"{k}={v}" for k, v in sorted(how.items())) + "\n"
    if stats["unchecked"]:
        text += (f"rows not checked against BBQ data (no <Category>.jsonl in {stats['data'] or 'no packaged copy'}): "
                 f"{stats['unchecked']}\n")
    if stats["not_in_data"]:
        text += (f"rows not in the BBQ data ({stats['data']}), scored with their own target_loc: "
                 f"{stats['not_in_data']}\n")
    if console is not None:
        console.print(text, markup=False, highlight=False)
    return {"dir": str(out), "match_methods": how, "n_unmatched": rep.n_unmatched, "summary": _summary(rep), "text": text}
