"""Runs: config snapshot, resume, atomic stages, config conflicts, corrupt directories, metrics files."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from excise.errors import ExciseError
from excise.measure.stats import Estimate, wilson
from excise.run import Run, seed_everything, write_metrics

CFG = {"workflow": "t", "model": "tiny", "seed": 0, "lr": 1e-3, "layers": [1, 2], "nested": {"a": 1}}


def test_config_snapshot_and_run_json(tmp_path):
    out = tmp_path / "run"
    run = Run(out, CFG)
    assert not out.exists()  # nothing is written before the first stage
    run.stage("s", lambda d: None)
    assert json.loads((out / "config.json").read_text()) == CFG
    info = json.loads((out / "run.json").read_text())
    assert "created" in info and "torch" in info["versions"] and "python" in info["versions"]
    assert json.loads((out / "s" / "stage.json").read_text())["status"] == "done"


def test_start_creates_directory(tmp_path):
    run = Run(tmp_path / "r", CFG).start()
    assert (tmp_path / "r" / "config.json").exists()
    assert run.start() is run  # idempotent


def test_resume_skips_finished_stages(tmp_path):
    calls = []

    def fn(d):
        calls.append(1)
        (d / "out.txt").write_text("x")
        return {"acc": 0.5}

    r1 = Run(tmp_path, CFG).stage("a", fn)
    assert not r1.skipped and r1.metrics == {"acc": 0.5} and r1.dir == tmp_path / "a"
    r2 = Run(tmp_path, dict(CFG)).stage("a", fn)
    assert r2.skipped and r2.metrics == {"acc": 0.5}
    assert len(calls) == 1
    assert (tmp_path / "a" / "out.txt").read_text() == "x"
    # a new stage in the same run still runs
    assert not Run(tmp_path, CFG).stage("b", fn).skipped and len(calls) == 2


def test_failing_stage_leaves_no_folder(tmp_path):
    run = Run(tmp_path, CFG)

    def boom(d):
        (d / "half.txt").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        run.stage("bad", boom)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "run.json"]  # no stage folder, no temp folder
    assert not run.is_done("bad")
    # re-running calls fn again and succeeds
    assert run.stage("bad", lambda d: {"ok": 1}).metrics == {"ok": 1}


def test_different_config_refused_unless_force(tmp_path):
    Run(tmp_path, CFG).stage("a", lambda d: {"x": 1})
    changed = dict(CFG, lr=1e-4)
    with pytest.raises(ExciseError, match="different config.*lr"):
        Run(tmp_path, changed)
    assert json.loads((tmp_path / "config.json").read_text()) == CFG
    run = Run(tmp_path, changed, force=True)
    assert (tmp_path / "a").exists()  # the old run is cleared only when the new one starts
    assert not run.is_done("a")
    calls = []
    run.stage("a", lambda d: calls.append(1) or {"x": 2})
    assert calls == [1]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-4


def test_non_empty_dir_without_config(tmp_path):
    (tmp_path / "stuff.txt").write_text("mine")
    with pytest.raises(ExciseError, match="not empty and holds no config.json"):
        Run(tmp_path, CFG)
    assert (tmp_path / "stuff.txt").exists()
    Run(tmp_path, CFG, force=True).stage("a", lambda d: None)
    assert not (tmp_path / "stuff.txt").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_config_json(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ExciseError, match="corrupt run directory") as ei:
        Run(tmp_path, CFG)
    assert "\n" not in str(ei.value)
    Run(tmp_path, CFG, force=True).stage("a", lambda d: None)
    assert json.loads((tmp_path / "config.json").read_text()) == CFG


def test_corrupt_stage_json(tmp_path):
    Run(tmp_path, CFG).stage("a", lambda d: None)
    (tmp_path / "a" / "stage.json").write_text('{"status": "running"}')
    with pytest.raises(ExciseError, match="corrupt run directory"):
        Run(tmp_path, CFG).stage("a", lambda d: None)
    (tmp_path / "a" / "stage.json").write_text("{oops")
    with pytest.raises(ExciseError, match=r"stage.json:1"):
        Run(tmp_path, CFG).stage("a", lambda d: None)


def test_output_path_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ExciseError, match="is a file"):
        Run(f, CFG)


def test_metrics_json_and_csv_with_nan(tmp_path):
    metrics = {
        "acc": 0.75,
        "undefined": float("nan"),
        "np_nan": np.float32("nan"),
        "inf": float("inf"),
        "zero": 0.0,
        "n": np.int64(12),
        "est": wilson(3, 4),
        "empty": Estimate.undefined("wilson"),
        "group": {"a": 1.0, "b": float("nan")},
        "curve": [0.1, float("nan")],
    }
    write_metrics(tmp_path, metrics)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["undefined"] is None and data["np_nan"] is None and data["inf"] is None
    assert data["zero"] == 0.0 and data["n"] == 12 and data["group"]["b"] is None
    assert data["est"]["n"] == 4 and data["est"]["value"] == 0.75
    assert data["empty"] == {"value": None, "lo": None, "hi": None, "n": 0, "method": "wilson"}
    assert data["curve"] == [0.1, None]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = {r["metric"]: r["value"] for r in csv.DictReader(f)}
    assert rows["acc"] == "0.75" and rows["zero"] == "0.0"
    assert rows["undefined"] == "" and rows["np_nan"] == "" and rows["group.b"] == ""
    assert rows["est.value"] == "0.75" and rows["est.n"] == "4" and rows["empty.value"] == ""
    assert json.loads(rows["curve"]) == [0.1, None]


def test_metrics_list_rows(tmp_path):
    rows = [{"group": "a", "acc": 0.5, "ci": wilson(1, 2)}, {"group": "b", "acc": float("nan")}]
    write_metrics(tmp_path, rows, name="by_group")
    assert json.loads((tmp_path / "by_group.json").read_text())[1]["acc"] is None
    with open(tmp_path / "by_group.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["ci.n"] == "2" and got[1]["acc"] == "" and got[1]["ci.n"] == ""


def test_stage_metrics_written(tmp_path):
    res = Run(tmp_path, CFG).stage("m", lambda d: {"x": float("nan"), "y": 2})
    assert math.isnan(res.metrics["x"])
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"x": None, "y": 2}
    assert (tmp_path / "m" / "metrics.csv").read_text().splitlines() == ["metric,value", "x,", "y,2"]
    # resumed metrics come back from disk (null for the undefined one)
    assert Run(tmp_path, CFG).stage("m", lambda d: {}).metrics == {"x": None, "y": 2}


def test_nan_in_config_still_resumes(tmp_path):
    cfg = dict(CFG, threshold=float("nan"))
    Run(tmp_path, cfg).stage("a", lambda d: None)
    assert Run(tmp_path, cfg).stage("a", lambda d: None).skipped


def test_seed_everything_repeatable():
    import random

    import torch

    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_dir_survives_a_failed_stage_and_goes_when_it_is_done(tmp_path):
    from excise.run import Run

    run = Run(tmp_path / "r", {"a": 1})
    ck = run.checkpoint_dir("train")

    def fail(d):
        ck.mkdir(parents=True)
        (ck / "step-2").mkdir()
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        run.stage("train", fail)
    assert (ck / "step-2").is_dir() and not run.is_done("train")  # a re-run resumes from here
    run.stage("train", lambda d: {"ok": True})
    assert not ck.exists() and run.is_done("train")
