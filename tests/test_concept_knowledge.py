"""`concept: knowledge`: the concept workflow on a (tiny) knowledge organism, with TOFU metrics per model state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_knowledge_concept_runs_with_tofu_against_the_oracle(tmp_path, monkeypatch):
    import excise.recipes.concept_unlearn as recipe
    from excise.testing import save_tiny

    save_tiny("llama", tmp_path / "model")
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    knowledge = {"base": str(tmp_path / "model"), "kb": {"n_forget": 2, "n_retain": 4, "n_holdout": 2, "n_validation": 1},
                 "epochs": 1, "batch_size": 5, "lr": 1e-3, "warmup_steps": 0, "mixed_precision": "no", "max_new_tokens": 4}
    settings = {"concept": "knowledge", "knowledge": knowledge, "threads": 1, "seed": 1, "screen": False,
                "max_new_tokens": 3, "select": {"method": "topk", "k": 16, "per_layer": False}, "unlearn": {"steps": 2},
                "compare": True}
    relearn = {"steps": 1, "eval_every": 1, "lrs": [1e-4]}
    res = recipe.run_recipe({**settings, "comparison": {"variants": ["masked_saliency", "plain_lora"], "relearn": relearn}},
                            tmp_path / "run")
    out = tmp_path / "run"
    head = json.loads((out / "tofu" / "tofu.json").read_text())
    assert list(head) == ["organism", "masked_saliency", "oracle"]
    assert head["oracle"]["forget_quality"] == pytest.approx(1.0)  # the oracle against its own scores
    assert 0 <= head["organism"]["forget_quality"] <= 1 and 0 <= head["masked_saliency"]["forget_quality"] <= 1
    assert all(h["model_utility"] is not None for h in head.values())
    full = json.loads((out / "tofu" / "tofu_masked_saliency.json").read_text())
    # retain is scored on the films the unlearning's KL term never saw: 2 of the 4 retained films, 5 items each
    assert full["by_group"]["retain"]["answer_prob"]["n"] == 10
    assert "forget quality" in (out / "tofu" / "tofu.md").read_text().lower()
    cmp_head = json.loads((out / "compare" / "tofu.json").read_text())
    assert list(cmp_head) == ["organism", "masked_saliency", "plain_lora", "oracle"]
    assert res["compare"]["plain_lora"]["tofu"]["forget_quality"] == cmp_head["plain_lora"]["forget_quality"]
    loc = json.loads((out / "compare" / "localization.json").read_text())["masks"]["saliency"]
    assert loc["n_units"] == 16 and loc["sets"]["forget_heldout"]["selected"]["n"] == 5  # half the 2 films' 10 facts
    # a longer variant list keeps what the finished comparison measured and trains only the new variant,
    # here with another objective (idk) at the same steps
    import excise.recipes.concept_compare as compare

    trained, real = [], compare.train_variant
    monkeypatch.setattr(compare, "train_variant", lambda *a, **k: trained.append(a[4]) or real(*a, **k))
    old_info = (out / "compare" / "plain_lora" / "info.json").read_text()
    res2 = recipe.run_recipe({**settings, "comparison": {
        "variants": ["masked_saliency", "plain_lora", "plain_lora@idk"], "relearn": relearn}}, tmp_path / "run")
    assert trained == ["plain_lora@idk"]
    assert (out / "compare" / "plain_lora" / "info.json").read_text() == old_info
    assert list(json.loads((out / "compare" / "tofu.json").read_text())) == [
        "organism", "masked_saliency", "plain_lora", "plain_lora@idk", "oracle"]
    assert json.loads((out / "compare" / "plain_lora@idk" / "info.json").read_text())["objective"] == "idk"
    assert res2["compare"]["plain_lora"] == res["compare"]["plain_lora"]
    assert "| objective | - | npo | npo | idk |" in (out / "compare" / "comparison.md").read_text()
    from excise.errors import ExciseError

    with pytest.raises(ExciseError, match="other settings"):  # other relearning settings: not the same measures
        recipe.run_recipe({**settings, "comparison": {"variants": ["masked_saliency"],
                                                      "relearn": {**relearn, "steps": 2}}}, tmp_path / "run")
    # the oracle's and the organism's rows come from the scores saved with them: the same result as measuring again
    from excise.organisms.knowledge import KnowledgeConfig, build_knowledge, kl_films, saved_result
    from excise.recipes.concept_knowledge import organism_reference, tofu

    org = build_knowledge(KnowledgeConfig(**knowledge))
    for which in ("oracle", "organism"):
        saved = saved_result(org, which, retain_exclude=kl_films(org))
        measured = tofu(org.load(which), org)
        assert saved is not None and saved.metrics == measured.metrics and saved.by_group.keys() == measured.by_group.keys()
        for a, b in zip(saved.rows(), measured.rows()):  # equal up to batching (other padding, float noise)
            assert (a["scope"], a["metric"], a["n"]) == (b["scope"], b["metric"], b["n"])
            assert [a[k] for k in ("value", "lo", "hi")] == pytest.approx([b[k] for k in ("value", "lo", "hi")],
                                                                             rel=1e-5, abs=1e-7, nan_ok=True)
        row = json.loads((out / "tofu" / f"tofu_{which}.json").read_text())["overall"]  # the run used the saved scores
        assert all(row[m]["value"] == saved[m].value for m in ("forget_answer_prob", "model_utility", "mia_min_k_auc"))
    # an organism cached before its scores were saved with it: measured once, then saved beside it
    org.scores_path("organism").unlink()
    first = organism_reference(org.load("organism"), org)
    assert org.scores_path("organism").exists()
    assert organism_reference(None, org).as_dict() == first.as_dict()  # read back: no model needed
    # the run's model is the organism, not the configured default
    # benchmarks/concept_seeds.py aggregates finished comparison runs (here the same run twice: zero paired differences)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import concept_seeds

    agg = tmp_path / "seeds"
    assert concept_seeds.main([str(out), str(out), "--pair", "plain_lora", "--out", str(agg)]) == 0
    summ = json.loads(agg.with_suffix(".json").read_text())
    assert list(summ["variants"]) == ["organism", "masked_saliency", "plain_lora", "plain_lora@idk", "oracle"]
    assert summ["variants"]["masked_saliency"]["n_seeds"] == 2 and summ["variants"]["oracle"]["fq_reaches_0.05"] == 2
    assert summ["variants"]["masked_saliency"]["direct leak"]["value"] == res["compare"]["masked_saliency"]["leak_direct"]
    assert summ["paired"]["masked_saliency - plain_lora"]["model utility"]["value"] == 0.0
    assert summ["localization"]["saliency / forget_heldout"]["n"] == 2  # one value per run read
    with pytest.raises(ExciseError, match="no finished TOFU stage"):
        concept_seeds.main([str(tmp_path)])


def test_packaged_knowledge_recipe_validates():
    from excise.config import load_yaml, validate
    from excise.recipes.loader import find_recipe
    from excise.recipes.concept_config import ConceptUnlearnConfig

    d = load_yaml(find_recipe("concept_knowledge.yaml"))
    assert d.pop("workflow") == "concept" and d.pop("out")
    cfg = validate(ConceptUnlearnConfig, d)
    assert cfg.concept == "knowledge" and not cfg.screen and len(cfg.knowledge.kb.model_dump()) > 0
