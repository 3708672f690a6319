"""Digests of a run directory's results, for "same seed, same bytes" comparisons (test_determinism.py,
test_kill_resume.py).

Left out, because they are not results: ``run.json`` and ``stage.json`` (dates, timings, library
versions), ``timings.json`` and ``report.html`` (dates, timings, the directory's name), and in JSON,
JSONL and CSV files every timing field: a key (or a dotted CSV metric name / column) with a part
ending in ``seconds`` or ``per_second``, or named ``created``, and in Markdown every table row whose
label ends in ``(s)`` (a time in seconds, e.g. "train time (s)"). Paths given as ``aliases`` (the run
directory itself, a cache) are replaced by a placeholder first, so two runs in two directories compare.
Every other file is compared byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

SKIP = ("run.json", "stage.json", "timings.json", "report.html")


def is_timing(key: object) -> bool:
    return any(p.endswith(("seconds", "per_second")) or p == "created" for p in str(key).split("."))


def drop_timing(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: drop_timing(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [drop_timing(v) for v in obj]
    return obj


def content(p: Path, aliases: dict[str, str]) -> bytes:
    """A file's bytes; JSON, JSONL and CSV without their timing fields, with ``aliases`` replaced."""
    data = p.read_bytes()
    if p.suffix not in (".json", ".jsonl", ".csv", ".md", ".txt"):
        return data
    text = data.decode("utf-8")
    for path, name in aliases.items():
        text = text.replace(path, name)
    if p.suffix == ".json":
        return json.dumps(drop_timing(json.loads(text)), sort_keys=True).encode()
    if p.suffix == ".jsonl":
        return json.dumps([drop_timing(json.loads(x)) for x in text.splitlines() if x.strip()]).encode()
    if p.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0] == ["metric", "value"]:
            rows = [r for r in rows if not is_timing(r[0])]
        elif rows:
            keep = [i for i, h in enumerate(rows[0]) if not is_timing(h)]
            rows = [[r[i] for i in keep if i < len(r)] for r in rows]
        return json.dumps(rows).encode()
    if p.suffix == ".md":
        text = "\n".join(x for x in text.splitlines() if not x.split("|")[1:2] or not x.split("|")[1].strip().endswith("(s)"))
    return text.encode()


def tree(root: Path, aliases: dict[str, Path] | None = None) -> dict[str, str]:
    """Every result file under ``root`` -> a digest of its comparable content. Fails on a ``.tmp`` or
    ``.checkpoints`` left behind (what a killed run may leave and the next one must tidy up)."""
    names = {str(Path(root)): "<run>", **{str(v): f"<{k}>" for k, v in (aliases or {}).items()}}
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        assert not p.name.endswith(".tmp") and ".checkpoints" not in rel, f"left behind: {rel}"
        if p.is_file() and p.name not in SKIP:
            out[rel] = hashlib.sha256(content(p, names)).hexdigest()
    assert out, f"no results under {root}"
    return out


def differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The files that are not the same in two digests (missing on one side included)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
