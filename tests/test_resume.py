"""Resume inside a stage (excise.resume) and what a killed run leaves: kept pieces read back as written
(NaN included), chunks redone only when they do not match, stale temporaries removed, a forced run's
predecessor put back when its first stage finds bad input. The end-to-end kill test is test_kill_resume.py."""

from __future__ import annotations

import json
import math

import pytest

from excise.errors import ExciseError
from excise.resume import Points, chunked, clean_temp, kill_point
from excise.run import Run


def test_points_round_trip_and_skip(tmp_path):
    pts = Points(tmp_path / "p")
    calls = []

    def compute():
        calls.append(1)
        return {"auc": math.nan, "curve": [(0, 0.5)], "x": 1.0 / 3}

    a = pts.cached("base@lr0.001", compute)
    b = Points(tmp_path / "p").cached("base@lr0.001", compute)  # a re-run: read back, not recomputed
    assert len(calls) == 1 and math.isnan(a["auc"]) and math.isnan(b["auc"])
    assert a["curve"] == b["curve"] == [[0, 0.5]] and a["x"] == b["x"] == 1.0 / 3
    odd = pts.put("a model/with: odd?chars", 3)  # keys that are not file names still get a file of their own
    assert odd == 3 and pts.get("a model/with: odd?chars") == 3 and pts.get("a model_with_ odd_chars") is None
    (pts.dir / "broken.json").write_text("{not json")
    assert pts.get("broken") is None  # an unreadable piece is redone


def test_chunks_are_fixed_slices_and_checked(tmp_path):
    items = list(range(10))
    seen: list[list[int]] = []

    def square(xs):
        seen.append(list(xs))
        return [x * x for x in xs]

    pts = Points(tmp_path / "c")
    assert chunked(pts, items, 4, square, ident=lambda x: x) == [x * x for x in items]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    (pts.dir / "chunk-00001.json").unlink()  # as if killed before the second chunk was kept
    seen.clear()
    assert chunked(Points(tmp_path / "c"), items, 4, square, ident=lambda x: x) == [x * x for x in items]
    assert seen == [[4, 5, 6, 7]]
    seen.clear()  # other items (another config) never reuse a kept chunk
    assert chunked(Points(tmp_path / "c"), [x + 1 for x in items], 4, square, ident=lambda x: x)[0] == 1
    assert len(seen) == 3


def test_folder_pieces_and_stale_temporaries(tmp_path):
    pts = Points(tmp_path / "f")
    path = pts.folder("model", lambda d: (d / "w.bin").write_bytes(b"1"))
    assert (path / "w.bin").read_bytes() == b"1"
    (pts.dir / ".model.tmp").mkdir()
    (pts.dir / ".chunk-00000.json.abc.tmp").write_text("half")
    Points(tmp_path / "f")  # opening tidies up what a killed write left
    assert sorted(p.name for p in pts.dir.iterdir()) == ["model"]
    clean_temp(tmp_path / "nosuch")  # nothing to do


def test_kill_point_logs_and_does_nothing_unset(tmp_path, monkeypatch):
    kill_point("unset")  # no variable set: nothing happens
    log = tmp_path / "events"
    monkeypatch.setenv("EXCISE_TEST_KILL_LOG", str(log))
    kill_point("a")
    kill_point("b")
    assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] == ["a", "b"]


def test_a_killed_stage_leaves_nothing_after_the_next_run(tmp_path):
    run = Run(tmp_path / "run", {"a": 1})
    run.stage("one", lambda d: {"x": 1})
    # what a SIGKILL inside stage "two" leaves: its temporary folder, a half-written file, checkpoints
    (tmp_path / "run" / ".two.k1ll3d.tmp").mkdir()
    (tmp_path / "run" / ".run.json.xyz.tmp").write_text("{")
    (run.checkpoint_dir("two") / "chunk-00000.json").parent.mkdir(parents=True)
    (run.checkpoint_dir("two") / "chunk-00000.json").write_text('{"value": 1}')
    again = Run(tmp_path / "run", {"a": 1})
    assert again.stage("one", lambda d: {"x": 2}).skipped
    seen = []
    again.stage("two", lambda d: seen.append(Points(again.checkpoint_dir("two")).get("chunk-00000")))
    assert seen == [1]  # the stage saw the kept piece
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "one", "run.json", "two"]


def _write(path, text: str) -> None:
    path.write_text(text)


def test_force_puts_the_old_run_back_when_the_first_stage_finds_bad_input(tmp_path):
    old = Run(tmp_path / "run", {"a": 1})
    old.stage("one", lambda d: _write(d / "keep.txt", "old"))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def bad(d):
        (d / "half.txt").write_text("new")
        raise ExciseError("bad input found inside the first stage")

    with pytest.raises(ExciseError):
        Run(tmp_path / "run", {"a": 2}, force=True).stage("one", bad)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    new = Run(tmp_path / "run", {"a": 2}, force=True)
    new.stage("one", lambda d: _write(d / "keep.txt", "new"))  # a good first stage replaces the old run
    assert (tmp_path / "run" / "one" / "keep.txt").read_text() == "new"
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing of the old run left aside
