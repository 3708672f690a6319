"""Atomic file writes: a reader never sees a half-written file, a crash leaves no partial output."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from excise.errors import ExciseError, where
from excise.processes import is_main_process, wait_for_everyone


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _plain(obj: Any) -> Any:
    """numpy / torch scalars and arrays, dataclasses (e.g. ``Estimate``), pydantic models, paths -> plain Python."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    try:
        return _json_default(obj)
    except TypeError:
        return obj


def _nan_to_none(obj: Any) -> Any:
    """JSON has no NaN; undefined numbers are written as null (never as 0).

    Also catches NaN hidden in numpy / torch scalars, arrays and dataclasses.
    """
    obj = _plain(obj)
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its metadata keys sorted: the library writes them in a random order,
    so the same tensors would not always give the same bytes (same seed, same bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(out, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as the format asks
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    # allow_nan=False: a NaN that slipped through would be invalid JSON; fail loudly instead
    text = json.dumps(_nan_to_none(obj), indent=indent, default=_json_default, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    buf = io.StringIO()
    for row in rows:
        buf.write(json.dumps(_nan_to_none(row), default=_json_default, ensure_ascii=False, allow_nan=False))
        buf.write("\n")
    return atomic_write_text(path, buf.getvalue())


def atomic_write_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Write dict rows as CSV; NaN is written as an empty cell."""
    if fieldnames is None:
        fieldnames = []
        for row in rows:
            for k in row:
                if k not in fieldnames:
                    fieldnames.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def _csv_cell(v: Any) -> Any:
    """NaN (also as a numpy / torch scalar) becomes an empty cell, never 0 or 'nan'."""
    v = _plain(v)
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def check_out_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Refuse an output directory that cannot be created: it, or a folder above it, is a file.

    Called before any work starts, so a bad ``--out`` fails at once instead of after a long run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExciseError(f"{what} {path} is a file, not a directory; choose another --out")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExciseError(f"{what} {path} is under {parent}, which is a file; choose another --out")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExciseError(f"{what} {path}: cannot write in {parent} (permission denied)")
            break
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only on success.

    If the body raises, the temporary directory is removed and ``path`` is untouched.
    """
    path = check_out_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def shared_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_dir`` for a folder that every launched process builds (a cache entry: an organism, a
    converted model): the main process moves its copy into place, the others discard theirs, and every
    process waits until it is there. In a single process it is ``atomic_dir``."""
    if is_main_process():
        with atomic_dir(path) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="excise-rank-") as tmp:
            yield Path(tmp)
    wait_for_everyone()


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a parse error into a one-line ExciseError naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExciseError(f"invalid JSON ({e.msg})", where=where(path, e.lineno)) from None
    except UnicodeDecodeError:
        raise ExciseError("invalid JSON (not UTF-8 text)", where=str(path)) from None
    except OSError as e:
        raise ExciseError(f"cannot read file ({e.strerror})", where=str(path)) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL file.

    A missing file, a line that is not JSON, or a line that is not an object is a one-line
    ExciseError naming the file and line, so every reader of user data fails the same way.
    """
    path = Path(path)
    if not path.exists():
        raise ExciseError("file not found", where=str(path))
    if not path.is_file():
        raise ExciseError("not a file (a JSONL file is expected)", where=str(path))
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ExciseError("not UTF-8 text (a binary file?)", where=where(path, lineno)) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExciseError(f"invalid JSON ({e.msg})", where=where(path, lineno)) from None
            if not isinstance(row, dict):
                raise ExciseError("expected a JSON object", where=where(path, lineno))
            yield lineno, row
