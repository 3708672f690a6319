"""Resume inside a stage: the finished pieces of a long stage (prediction chunks, sweep points) kept on disk.

Why: a stage is atomic (:mod:`excise.run`), so a stage killed midway would restart from its first
batch. A stage that stores each finished piece in its checkpoint area (``Run.checkpoint_dir``) with
:class:`Points` skips those pieces on the re-run. Values go through JSON (NaN and infinities kept,
floats exactly), and callers use the value *read back*, so a fresh and a resumed run hold the same
numbers and write the same bytes.

Test hook (one small place): with ``EXCISE_TEST_KILL_AFTER=n`` the process kills itself with
SIGKILL at its n-th :func:`kill_point` (a stage, checkpoint, chunk or training step just finished);
``EXCISE_TEST_KILL_LOG=path`` appends one line per kill point (its number and tag), so a test can
count them and pick where to kill (``tests/test_kill_resume.py``). Neither is set in normal use, and
:func:`kill_point` then does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

from excise.io import _json_default, atomic_write_text

KILL_AFTER, KILL_LOG = "EXCISE_TEST_KILL_AFTER", "EXCISE_TEST_KILL_LOG"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@=+-]*")
_seen = 0  # kill points passed in this process


def kill_point(tag: str) -> None:
    """A moment a test may kill the process at (see the module doc); nothing unless the test variables are set."""
    global _seen
    after, log = os.environ.get(KILL_AFTER), os.environ.get(KILL_LOG)
    if not after and not log:
        return
    _seen += 1
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_seen} {tag}\n")
    if after and _seen == int(after):
        os.kill(os.getpid(), signal.SIGKILL)


def clean_temp(directory: str | Path, prefix: str = "") -> None:
    """Remove what killed atomic writes left in ``directory``: ``.<prefix>*.tmp`` files and folders."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.glob(f".{prefix}*.tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class Points:
    """Finished pieces of one stage, one JSON file (or folder) per key, in ``directory``.

    The directory is created on the first write and is the stage's to remove when it finishes
    (``Run.stage`` removes ``Run.checkpoint_dir``); what a killed write left is removed on opening.
    Under ``accelerate launch`` every process reads the pieces (so all skip the same ones and their
    collective steps stay in step) but only the main one writes (the run directory has one writer);
    the others put folder pieces they compute in a scratch folder of their own.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.writer = int(os.environ.get("RANK", "0") or 0) == 0
        self._scratch: Path | None = None
        if self.writer:
            clean_temp(self.dir)

    def _path(self, key: str, suffix: str = ".json") -> Path:
        """``key`` as a file name (other characters replaced, and a digest added so keys stay apart)."""
        if not _KEY.fullmatch(key):
            key = re.sub(r"[^A-Za-z0-9_.@=+-]", "_", key).lstrip("._-")[:80] + "-" + \
                hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
        return self.dir / f"{key}{suffix}"

    def get(self, key: str) -> Any | None:
        """The stored value, or None when the piece is not there (or unreadable: it is then redone)."""
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, value: Any) -> Any:
        """Store ``value`` atomically and return it as read back (what a resumed run will see)."""
        value = _round_trip(value)
        if self.writer:
            text = json.dumps({"value": value}, ensure_ascii=False, allow_nan=True)
            atomic_write_text(self._path(key), text + "\n")
            kill_point(f"point:{self.dir.name}/{key}")
        return value

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The stored value of ``key``, else ``compute()`` stored and read back."""
        got = self.get(key)
        return got if got is not None else self.put(key, compute())

    def folder_path(self, key: str) -> Path:
        return self._path(key, "")

    def folder(self, key: str, write: Callable[[Path], None]) -> Path:
        """Store a folder piece (e.g. a saved model): ``write(tmp)`` fills it, then it replaces any old one.
        Returns where it is (a scratch folder on processes other than the main one)."""
        final = self.folder_path(key)
        if not self.writer:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="excise-points-"))
                weakref.finalize(self, shutil.rmtree, self._scratch, True)
            final = self._scratch / final.name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kill_point(f"folder:{self.dir.name}/{key}")
        return final

    def remove(self, name: str) -> None:
        """Remove something kept under the directory (e.g. a finished loop's training checkpoints); main process only."""
        if self.writer:
            shutil.rmtree(self.dir / name, ignore_errors=True)


def _round_trip(value: Any) -> Any:
    """``value`` as :meth:`Points.put` would return it (the same numbers with or without a store)."""
    return json.loads(json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=True))


def link_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a finished folder piece into a stage's output by hard links (a plain copy where links fail)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def chunked(points: Points | None, items: Sequence[Any], size: int, compute: Callable[[Sequence[Any]], list],
            ident: Callable[[Any], Any], *, on_chunk: Callable[[int], None] | None = None) -> list:
    """``compute`` over ``items`` in chunks of ``size``, each chunk stored in ``points`` (``chunk-00000`` ..).

    A stored chunk is used only if it holds the same items (by ``ident``) and one result per item;
    chunks are always the same slices, so a resumed run computes each chunk exactly as a fresh one.
    ``on_chunk(n)`` is told how many items each chunk covered (a progress bar).
    """
    out: list = []
    for k, start in enumerate(range(0, len(items), size)):
        part = items[start:start + size]
        ids = [ident(x) for x in part]
        key = f"chunk-{k:05d}"
        got = points.get(key) if points is not None else None
        if not (isinstance(got, dict) and got.get("ids") == _round_trip(ids)
                and len(got.get("rows", ())) == len(part)):
            value = {"ids": ids, "rows": list(compute(part))}
            got = points.put(key, value) if points is not None else _round_trip(value)
        out.extend(got["rows"])
        if on_chunk is not None:
            on_chunk(len(part))
    return out
