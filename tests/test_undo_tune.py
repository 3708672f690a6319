"""benchmarks/undo_tune.py: the selection rule, and a --quick run that scores the dev pool only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_pick_keeps_retain_then_lowest_forget_then_fewer_steps():
    import undo_tune

    rows = [{"lr": 1e-3, "steps": 30, "forget": 0.00, "retain": 0.80},   # forgets best but loses retain
            {"lr": 5e-4, "steps": 60, "forget": 0.10, "retain": 0.93},
            {"lr": 2e-4, "steps": 60, "forget": 0.10, "retain": 0.97},   # tie on forget, same steps, lower lr
            {"lr": 5e-4, "steps": 120, "forget": 0.10, "retain": 0.99}]  # tie on forget, more steps
    assert undo_tune.pick(rows, base_retain=1.0) == rows[2]
    assert undo_tune.pick(rows, base_retain=1.2) is None  # nothing keeps 90% of 1.2


@pytest.mark.slow
def test_quick_tune_scores_the_dev_pool_only(tmp_path, monkeypatch):
    import undo_tune

    from excise.tasks import arithmetic

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    pools: list[str] = []
    real = arithmetic.eval_items

    def spy(*a, **kw):
        pools.append(kw.get("pool", "test"))
        return real(*a, **kw)

    monkeypatch.setattr("excise.recipes.robust_unlearn.eval_items", spy)
    assert undo_tune.main(["--quick", "--methods", "maxent", "npo", "--out", str(tmp_path / "tune")]) == 0
    res = json.loads((tmp_path / "tune.json").read_text())
    assert set(res["methods"]) == {"maxent", "npo"} and all(len(m["rows"]) == 1 for m in res["methods"].values())
    assert pools and set(pools) == {"dev"}  # the test pool is never looked at
    assert "## maxent: pick" in (tmp_path / "tune.md").read_text()
