"""benchmarks/concept_tune.py reads only the knowledge organism's validation films (tuning never sees a test item)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_tuning_reads_only_the_validation_split(tmp_path, monkeypatch):
    import concept_tune

    import excise.organisms.knowledge as knowledge
    from excise.testing import save_tiny

    save_tiny("llama", tmp_path / "model")
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    recipe = {"workflow": "concept", "concept": "knowledge", "seed": 0, "screen": False, "max_new_tokens": 3,
              "knowledge": {"base": str(tmp_path / "model"), "kb": {"n_forget": 2, "n_retain": 4, "n_holdout": 2,
                                                                   "n_validation": 2},
                            "epochs": 1, "batch_size": 5, "lr": 1e-3, "warmup_steps": 0, "mixed_precision": "no",
                            "max_new_tokens": 4},
              "select": {"method": "topk", "k": 16, "per_layer": False}, "unlearn": {"steps": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    seen: list[tuple] = []
    real_eval, real_spec = knowledge.evaluate_knowledge, knowledge.concept_spec

    def spy_eval(*a, **kw):
        seen.append(("evaluate", kw.get("split", "test")))
        return real_eval(*a, **kw)

    def spy_spec(org, split="test"):
        seen.append(("spec", split))
        return real_spec(org, split)

    knowledge.build_knowledge(knowledge.KnowledgeConfig(**recipe["knowledge"]))  # the build scores both splits itself
    monkeypatch.setattr(knowledge, "evaluate_knowledge", spy_eval)
    monkeypatch.setattr(knowledge, "concept_spec", spy_spec)
    out = tmp_path / "tune"
    assert concept_tune.main(["--recipe", str(tmp_path / "r.yaml"), "--lrs", "1e-3", "--epochs", "0.4", "0.8",
                              "--threads", "1", "--out", str(out)]) == 0
    assert seen and {s for _, s in seen} == {"validation"}  # every score and the spec came from the validation films
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["steps"] for r in res["rows"]] == [1, 2] and 0 <= res["rows"][0]["forget_quality"] <= 1
    assert "no test item read" in out.with_suffix(".md").read_text()


def test_pick_rule():
    import concept_tune

    rows = [{"forget_quality": 0.5, "model_utility": 0.5, "steps": 15, "lr": 1e-3},  # utility too low
            {"forget_quality": 0.2, "model_utility": 0.95, "steps": 30, "lr": 1e-3},
            {"forget_quality": 0.2, "model_utility": 0.95, "steps": 15, "lr": 3e-3},
            {"forget_quality": 0.1, "model_utility": 1.0, "steps": 15, "lr": 1e-4}]
    assert concept_tune.pick(rows, 1.0) is rows[2]  # best quality kept; tie -> fewer steps
    assert concept_tune.pick(rows[:1], 1.0) is None
