"""benchmarks/undo_sweep.py at --quick scale: outputs, and a resumed sweep redoes only missing points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_quick_sweep_writes_the_tradeoff_and_resumes_only_missing_points(tmp_path, monkeypatch, capsys):
    import undo_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    assert undo_sweep.main(["--quick", "--out", str(out)]) == 0
    for name in ("table.md", "sweep.csv", "sweep.json", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "sweep.json").read_text())
    variants = {r["variant"] for r in res["rows"]}
    assert variants == {"global-a0.8", "paramdiff-p0.1-a0.8"}
    assert {r["fraction"] for r in res["rows"]} == {0.0, 0.5, 1.0}
    assert "student" in (out / "table.md").read_text() and "teacher" in (out / "table.md").read_text()
    # the paired comparison: one seed has both variants at every fraction
    pair = res["paired"]
    assert (pair["a"], pair["b"]) == ("paramdiff-p0.1-a0.8", "global-a0.8")
    assert [r["n_seeds"] for r in pair["rows"]] == [1, 1, 1] and "Paired difference" in (out / "table.md").read_text()
    assert set(res["references"]) == {"base", "oracle", "teacher"}
    points = out / "points"
    half = next(points.glob("s0.global-a0.8@0.5*.json"))
    full = next(points.glob("s0.global-a0.8@1*.json"))
    kept = full.read_bytes()
    assert json.loads(kept)["value"]["student_flops"] == 3 * json.loads(kept)["value"]["teacher_flops"] > 0
    before = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    # a sweep killed before its 50% point of one variant: only that point is measured again, same bytes
    removed = half.read_bytes()
    half.unlink()
    capsys.readouterr()
    assert undo_sweep.main(["--quick", "--out", str(out)]) == 0
    assert half.read_bytes() == removed
    after = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    assert {k for k in after if after[k] != before.get(k)} == {half.name}
    assert "paramdiff-p0.1-a0.8: " not in capsys.readouterr().out  # the finished variant was not distilled again
    # --report-only summarizes the kept points without computing any: the same table
    table = (out / "table.md").read_text()
    assert undo_sweep.main(["--quick", "--report-only", "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == table and "measured up to" in table
    assert {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")} == after
    # the per-seed points are kept in sweep.json, and --merge-with joins an earlier sweep's other variants
    res = json.loads((out / "sweep.json").read_text())
    assert "s0.base" in res["points"] and "s0.global-a0.8@1" in res["points"]
    old = dict(res, rows=[dict(r, variant="snmf-p0.1-a0.8") for r in res["rows"] if r["variant"] == "global-a0.8"],
               points={"s0.snmf-p0.1-a0.8@1": {"forget": 0.5}})
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert undo_sweep.main(["--quick", "--report-only", "--out", str(out), "--merge-with", str(tmp_path / "old.json")]) == 0
    merged = json.loads((out / "sweep.json").read_text())
    assert [v for v in dict.fromkeys(r["variant"] for r in merged["rows"])] == [
        "snmf-p0.1-a0.8", "global-a0.8", "paramdiff-p0.1-a0.8"]
    assert "s0.snmf-p0.1-a0.8@1" in merged["points"] and "snmf-p0.1-a0.8" in (out / "table.md").read_text()
    # an earlier sweep whose references differ did not reproduce this one: refused
    old["references"]["base"]["retain"]["value"] += 0.01
    (tmp_path / "old.json").write_text(json.dumps(old))
    from excise.errors import ExciseError

    with pytest.raises(ExciseError, match="do not reproduce"):
        undo_sweep.main(["--quick", "--report-only", "--out", str(out), "--merge-with", str(tmp_path / "old.json")])
