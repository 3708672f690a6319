"""Users' own fairness data: CSV, JSONL or a Hugging Face dataset with configurable columns.

Every row is validated; a bad one stops loading with one line naming ``file:line:field``
(missing column or field, empty text, unknown label, empty group value, bytes that are not
UTF-8, a ragged CSV row, an empty file). CSV line numbers are those of the row's first physical
line (header = line 1); Hugging Face rows are named ``<dataset>[<split>]:<row index>:<field>``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from excise.config import validate
from excise.errors import ExciseError, where
from excise.tasks.fairness_data import FairExample, FairTable

_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_INT = re.compile(r"-?\d+")


class TableConfig(BaseModel):
    """Which columns hold what, for :func:`load_table` and :func:`load_hf`."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field("text", description="column with the text to classify")
    label: str = Field("label", description="column with the class label (string or integer)")
    groups: dict[str, str] = Field(default_factory=lambda: {"group": "group"},
                                   description="protected attribute name -> column; the first stratifies splits")
    text_pair: str | None = Field(None, description="optional second text (document, job ad)")
    label_names: list[str] | None = Field(
        None, description="label order; a value outside it is an error. Default: the values seen, sorted "
                          "(numerically when all are integers)")
    format: Literal["auto", "csv", "jsonl"] = Field("auto", description="auto: from the suffix (.csv/.tsv, .jsonl/.ndjson)")
    delimiter: str | None = Field(None, description="CSV delimiter; default ',' (tab for .tsv)")
    drop_duplicates: bool = Field(True, description="drop exact repeats (text, pair, label, groups); counted in meta")
    keep: list[str] = Field(default_factory=list, description="other columns to keep in each example's extra")

    @field_validator("label_names")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(set(v)) != len(v) or not v):
            raise ValueError("label_names must be distinct and non-empty")
        return v


def _groups_arg(groups: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(groups, str):
        return {groups: groups}
    if isinstance(groups, Mapping):
        return {str(k): str(v) for k, v in groups.items()}
    return {str(g): str(g) for g in groups}


def _config(text: str, label: str, groups: Any, text_pair: str | None, **kw: Any) -> TableConfig:
    cfg = validate(TableConfig, {"text": text, "label": label, "groups": _groups_arg(groups), "text_pair": text_pair,
                                 **{k: v for k, v in kw.items() if v is not None}}, source="load_table")
    if not cfg.groups:
        raise ExciseError("at least one protected attribute column is needed (groups=...)")
    return cfg


def _string(v: Any, loc: str, *, what: str, allow_empty: bool = False) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ExciseError(f"expected a string, got {type(v).__name__}", where=loc)
    s = v if isinstance(v, str) else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    if _BAD_BYTES.search(s):
        raise ExciseError("not valid UTF-8 (save the file as UTF-8)", where=loc)
    if not allow_empty and not s.strip():
        raise ExciseError(f"empty {what}", where=loc)
    return s


def parse_row(row: Mapping[str, Any], path: str, line: int | None, cfg: TableConfig,
              label_index: Mapping[str, int] | None) -> tuple[FairExample, str]:
    """Validate one row; returns the example (label -1 until labels are known) and its raw label."""
    def get(col: str) -> Any:
        if col not in row:
            raise ExciseError("missing field", where=where(path, line, col))
        v = row[col]
        if v is None:
            raise ExciseError("empty value (null)", where=where(path, line, col))
        return v

    text = _string(get(cfg.text), where(path, line, cfg.text), what="text")
    pair = _string(get(cfg.text_pair), where(path, line, cfg.text_pair), what="text") if cfg.text_pair else None
    lab = _string(get(cfg.label), where(path, line, cfg.label), what="label").strip()
    groups = {a: _string(get(c), where(path, line, c), what="group value").strip() for a, c in cfg.groups.items()}
    idx = -1
    if label_index is not None:
        if lab not in label_index:
            names = ", ".join(label_index)
            raise ExciseError(f"unknown label {lab!r} (labels: {names[:200]})", where=where(path, line, cfg.label))
        idx = label_index[lab]
    extra = {c: row.get(c) for c in cfg.keep if c in row}
    return FairExample(text=text, text_pair=pair, label=idx, groups=groups, source=where(path, line), extra=extra), lab


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ExciseError("file not found", where=str(path))
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise ExciseError("empty file", where=str(path))
    return text


def _csv_rows(path: Path, cfg: TableConfig) -> Iterator[tuple[int, dict[str, str]]]:
    delim = cfg.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delim)
    try:
        header = next(reader)
        while not header:
            header = next(reader)
    except StopIteration:
        raise ExciseError("empty file", where=str(path)) from None
    except csv.Error as e:
        raise ExciseError(f"bad CSV ({e})", where=where(path, reader.line_num)) from None
    header_line = reader.line_num
    header = [h.strip() for h in header]
    for h in header:
        if _BAD_BYTES.search(h):
            raise ExciseError("not valid UTF-8 (save the file as UTF-8)", where=where(path, header_line))
    dup = [h for h in header if header.count(h) > 1]
    if dup:
        raise ExciseError("duplicate column", where=where(path, header_line, dup[0]))
    needed = [cfg.text, cfg.label, *cfg.groups.values()] + ([cfg.text_pair] if cfg.text_pair else [])
    for col in needed:
        if col not in header:
            raise ExciseError(f"missing column (columns: {', '.join(header)[:200]})", where=where(path, header_line, col))
    prev = header_line
    try:
        for rec in reader:
            start, prev = prev + 1, reader.line_num
            if not rec or (len(rec) == 1 and not rec[0].strip()):
                continue
            if len(rec) != len(header):
                raise ExciseError(f"expected {len(header)} fields, got {len(rec)}", where=where(path, start))
            yield start, dict(zip(header, rec))
    except csv.Error as e:
        raise ExciseError(f"bad CSV ({e})", where=where(path, prev + 1)) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad = _BAD_BYTES.search(line)
            msg = "not valid UTF-8 (save the file as UTF-8)" if bad else f"invalid JSON ({e.msg})"
            raise ExciseError(msg, where=where(path, lineno)) from None
        if not isinstance(row, dict):
            raise ExciseError("expected a JSON object", where=where(path, lineno))
        yield lineno, row


def _label_order(raw: Iterable[str]) -> tuple[str, ...]:
    vals = set(raw)
    if vals and all(_INT.fullmatch(v) for v in vals):
        return tuple(sorted(vals, key=int))
    return tuple(sorted(vals))


def _finish(rows: list[tuple[FairExample, str]], cfg: TableConfig, source: str, where_empty: str) -> FairTable:
    if not rows:
        raise ExciseError("no data rows", where=where_empty)
    names = tuple(cfg.label_names) if cfg.label_names is not None else _label_order(lab for _, lab in rows)
    index = {n: i for i, n in enumerate(names)}
    exs, seen, dropped = [], set(), 0
    for ex, lab in rows:
        ex = ex if ex.label >= 0 else ex.with_(label=index[lab])
        if cfg.drop_duplicates:
            if ex.id in seen:
                dropped += 1
                continue
            seen.add(ex.id)
        exs.append(ex)
    meta = {"built": {"source": source, "rows": len(rows), "duplicates_dropped": dropped, "n": len(exs),
                      "columns": cfg.model_dump(exclude={"label_names"})}}
    return FairTable(examples=exs, label_names=names, attributes=tuple(cfg.groups), meta=meta)


def load_table(path: str | Path, *, text: str = "text", label: str = "label",
               groups: str | Sequence[str] | Mapping[str, str] = "group", text_pair: str | None = None,
               label_names: Sequence[str] | None = None, format: str = "auto", delimiter: str | None = None,
               drop_duplicates: bool = True, keep: Sequence[str] = ()) -> FairTable:
    """Load a CSV (or TSV) or JSONL file of labelled texts with protected attributes.

    ``groups`` names the attribute column(s): one name, a list, or ``{attribute: column}``. Labels
    are strings or integers, mapped to indices in ``label_names`` order (given, or the sorted
    values seen). Exact repeated rows are dropped (``drop_duplicates``) and counted in
    ``meta["built"]``. Split the result with :meth:`FairTable.split` / ``split_dataset``.
    """
    path = Path(path)
    cfg = _config(text, label, groups, text_pair, label_names=[str(n) for n in label_names] if label_names is not None else None,
                  format=format, delimiter=delimiter, drop_duplicates=drop_duplicates, keep=list(keep))
    fmt = cfg.format
    if fmt == "auto":
        suf = path.suffix.lower()
        fmt = "csv" if suf in (".csv", ".tsv") else "jsonl" if suf in (".jsonl", ".ndjson") else ""
        if not fmt:
            raise ExciseError(f"cannot tell the format from '{suf or path.name}': pass format='csv' or 'jsonl'",
                              where=str(path))
    index = {n: i for i, n in enumerate(cfg.label_names)} if cfg.label_names is not None else None
    rows_iter = _csv_rows(path, cfg) if fmt == "csv" else _jsonl_rows(path)
    rows = [parse_row(row, str(path), line, cfg, index) for line, row in rows_iter]
    return _finish(rows, cfg, str(path), str(path))


def load_hf(dataset: str | Path, split: str | None = None, *, text: str = "text", label: str = "label",
            groups: str | Sequence[str] | Mapping[str, str] = "group", text_pair: str | None = None,
            label_names: Sequence[str] | None = None, name: str | None = None, revision: str | None = None,
            drop_duplicates: bool = True, keep: Sequence[str] = ()) -> FairTable:
    """Load from a Hugging Face dataset: a ``save_to_disk`` directory, a local data file or
    directory, or a hub id (``datasets.load_dataset``). ``split`` picks one split (default: all).
    Integer labels of a ``ClassLabel`` column keep the dataset's own names unless ``label_names``
    is given. Errors name ``<dataset>[<split>]:<row index>:<field>``."""
    try:
        import datasets  # heavy (pandas, pyarrow): only when a Hugging Face dataset is asked for
    except ImportError:  # pragma: no cover
        raise ExciseError("loading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    cfg = _config(text, label, groups, text_pair, label_names=[str(n) for n in label_names] if label_names is not None else None,
                  drop_duplicates=drop_duplicates, keep=list(keep))
    p = Path(dataset).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix.lower())
            if kind is None:
                raise ExciseError(f"unknown data file type '{p.suffix}'", where=str(p))
            ds = datasets.load_dataset(kind, data_files=str(p))
        else:
            kw: dict[str, Any] = {"revision": revision} if revision else {}
            ds = datasets.load_dataset(str(p) if p.exists() else str(dataset), name, **kw)
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExciseError(f"cannot load dataset '{dataset}' ({first[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is not None and split not in ds:
            raise ExciseError(f"dataset '{dataset}' has no split '{split}' (splits: {', '.join(ds)})")
        parts = [(s, ds[s]) for s in ([split] if split else list(ds))]
    else:
        parts = [(split or "data", ds)]
    rows = []
    for s, part in parts:
        loc = f"{dataset}[{s}]"
        missing = [c for c in [cfg.text, cfg.label, *cfg.groups.values(), cfg.text_pair] if c and c not in part.column_names]
        if missing:
            raise ExciseError(f"missing column (columns: {', '.join(part.column_names)[:200]})",
                              where=where(loc, None, missing[0]))
        feat = part.features.get(cfg.label)
        if cfg.label_names is None and isinstance(feat, datasets.ClassLabel):
            cfg = cfg.model_copy(update={"label_names": list(feat.names)})
        index = {n: i for i, n in enumerate(cfg.label_names)} if cfg.label_names is not None else None
        for i, row in enumerate(part):
            if isinstance(feat, datasets.ClassLabel) and isinstance(row.get(cfg.label), int) and row[cfg.label] >= 0:
                row = {**row, cfg.label: feat.int2str(row[cfg.label])}
            rows.append(parse_row(row, loc, i, cfg, index))
    return _finish(rows, cfg, str(dataset), f"{dataset}")
