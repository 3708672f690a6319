"""The fair-encoder workflow end to end: tiny encoder (fast) and the real MiniLM (slow, --quick sizes)."""

from __future__ import annotations

import json

import pytest

from excise.config import validate
from excise.errors import ExciseError
from excise.recipes.fair_config import FairEncoderConfig
from excise.recipes.fair_encoder import run_fair
from excise.testing import save_tiny

TINY = {"train_limit": 64, "val_limit": 32, "cap_per_class": 40, "n_boot": 20,
        "plain": {"epochs": 1, "patience": 0, "batch_size": 16, "max_length": 32},
        "fair": {"epochs": 2, "patience": 0, "batch_size": 16, "max_length": 32, "lambda_adv": 1.0, "lambda_eo": 1.0},
        "baselines": {"eg_eps": [0.05]}}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("enc") / "bert")


def test_workflow_runs_resumes_and_keeps_pools_apart(tiny_bert, tmp_path, one_thread):
    cfg = validate(FairEncoderConfig, {"model": str(tiny_bert), **TINY})
    out = tmp_path / "run"
    res = run_fair(cfg, out)
    assert set(res) >= {"data", "baselines", "plain", "fair", "report"}
    names = set(json.loads((out / "report" / "metrics.json").read_text())["methods"])
    assert {"frozen + logreg", "plain LoRA", "fair LoRA", "fairlearn ThresholdOptimizer (EO)"} <= names
    for f in ("report.md", "comparison.csv", "pareto.png", "checkpoints.png", "calibration.png", "targets.json"):
        assert (out / "report" / f).exists(), f
    assert (out / "fair" / "train" / "epoch_metrics.csv").exists()
    assert (out / "fair" / "export" / "adapter_config.json").exists()
    # three pools: training, validation (selection, temperature, threshold) and test (reported) never overlap
    from excise.recipes.fair_encoder import _subsample
    from excise.tasks.fairness import load_bug

    d = load_bug(cap_per_class=40, seed=0, binary=True)
    tr, va = _subsample(d.train, 64, 0), _subsample(d.val, 32, 1)
    te = {e.id for e in d.test}
    assert not ({e.id for e in tr} & te) and not ({e.id for e in va} & te) and not ({e.id for e in tr} & {e.id for e in va})
    fair = json.loads((out / "fair" / "test.json").read_text())
    assert fair["overall"]["macro_f1"]["n"] == len(d.test)  # reported on the whole test split
    again = run_fair(cfg, out)  # every stage resumes, with the numbers it wrote (NaN is saved as null)
    assert json.loads(json.dumps(res["fair"]).replace("NaN", "null")) == again["fair"]


def test_config_errors_are_one_line():
    with pytest.raises(ExciseError, match="fair.*lambda"):
        validate(FairEncoderConfig, {"fair": {"epochs": 1}})
    with pytest.raises(ExciseError, match="plain"):
        validate(FairEncoderConfig, {"plain": {"lambda_eo": 1.0}})
    with pytest.raises(ExciseError, match="unknown setting"):
        validate(FairEncoderConfig, {"fair": {"lambda_eo": 1.0, "lamda_adv": 1.0}})


@pytest.mark.slow
def test_quick_recipe_on_minilm(tmp_path):
    from excise.recipes.loader import run_recipe_file

    res = run_recipe_file("fair_encoder.yaml", out=tmp_path / "q", quick=True)
    t = res["report"]["targets"]
    assert "eo_at_most_half_of_plain" in t and "counterfactual_flip_rate_falls" in t


def test_user_csv_runs_through_the_workflow(tiny_bert, tmp_path, one_thread):
    import csv
    import random

    rng = random.Random(0)
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["resume", "job", "hired", "gender"])
        for i in range(160):
            g = rng.choice(["f", "m"])
            w.writerow([f"{'she' if g == 'f' else 'he'} wrote code {i}", "engineer", rng.choice(["yes", "no"]), g])
    settings = {**TINY, "model": str(tiny_bert), "data": "user", "counterfactual": False,
                "user_data": {"path": str(path), "text": "resume", "text_pair": "job", "label": "hired", "groups": "gender"}}
    res = run_fair(validate(FairEncoderConfig, settings), tmp_path / "run")
    assert res["data"]["attribute"] == "gender" and res["data"]["splits"]["test"]["n"] > 0
    assert "fair LoRA" in res["report"]["methods"]
    with pytest.raises(ExciseError, match="user_data"):
        validate(FairEncoderConfig, {"data": "user"})
