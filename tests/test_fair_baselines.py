"""Frozen-embedding baselines (logistic probe, Fairlearn ExponentiatedGradient and ThresholdOptimizer) on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from excise.errors import ExciseError
from excise.intervene.fair_baselines import BaselineConfig, run_baselines


def _data(n, seed, n_classes=2):
    rng = np.random.default_rng(seed)
    g = rng.choice(["f", "m"], size=n)
    y = rng.integers(0, n_classes, size=n)
    # the label is readable from dims 0..1, and the group leaks through dim 2 as a shortcut
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[:, 0] += 1.5 * y
    x[:, 2] += 1.0 * (g == "f") + 0.8 * (y == 1) * (g == "f")
    return x, y, g


def test_binary_runs_every_baseline_and_is_seeded():
    xtr, ytr, gtr = _data(400, 0)
    xva, yva, gva = _data(200, 1)
    xte, yte, gte = _data(200, 2)
    cfg = BaselineConfig(eg_eps=[0.05])
    preds, skipped = run_baselines(xtr, ytr, gtr, xva, yva, gva, xte, gte, cfg)
    assert not skipped
    assert [p.name.split(" (")[0] for p in preds] == ["frozen + logreg", "fairlearn ExponentiatedGradient",
                                                      "fairlearn ThresholdOptimizer"]
    for p in preds:
        assert p.y_pred.shape == (200,) and set(np.unique(p.y_pred)) <= {0, 1}
        assert (p.y_pred == yte).mean() > 0.6  # the label is learnable
    again, _ = run_baselines(xtr, ytr, gtr, xva, yva, gva, xte, gte, cfg)
    assert all(np.array_equal(a.y_pred, b.y_pred) for a, b in zip(preds, again))


def test_multiclass_skips_fairlearn_with_a_reason():
    xtr, ytr, gtr = _data(300, 0, n_classes=3)
    preds, skipped = run_baselines(xtr, ytr, gtr, xtr, ytr, gtr, xtr, gtr)
    assert len(preds) == 1 and preds[0].y_prob.shape == (300, 3)
    assert "binary" in skipped[0]


def test_one_class_is_one_line():
    x = np.zeros((10, 3))
    with pytest.raises(ExciseError, match="one class"):
        run_baselines(x, [1] * 10, ["a"] * 10, x, [1] * 10, ["a"] * 10, x, ["a"] * 10)
