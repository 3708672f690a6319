"""The biased BBQ organism and its study: disjoint pools, causal ground truth, localizer scores, end to end on a tiny model."""

from __future__ import annotations

import random

import numpy as np
import pytest

from excise.errors import ExciseError


def _pairs(n=8):
    from test_bbq_locate import _pairs as synthetic_pairs  # tests/ is on sys.path (rootdir conftest)

    return synthetic_pairs(n)


def _key(x):
    return (x.category, x.example_id)


def test_organism_split_is_disjoint_and_order_free():
    from excise.organisms.biased_bbq import BiasedConfig, organism_split, training_examples
    from excise.tasks.bbq import load_bbq

    cfg = BiasedConfig(categories=["Age", "SES"], steps=10)
    items = load_bbq(cfg.categories)
    parts = organism_split(cfg, items)
    t_train = {(x.category, x.question_index) for x in parts["train"]}
    t_held = {(x.category, x.question_index) for x in parts["heldout_templates"]}
    assert t_train and t_held and not (t_train & t_held)  # templates never trained on
    names = {(x.category, x.question_index, tuple(sorted(a.lower() for a in x.answers))) for x in parts["heldout_names"]}
    trained = {(x.category, x.question_index, tuple(sorted(a.lower() for a in x.answers))) for x in parts["train"]}
    assert names and not (names & trained)  # unseen entity pairs inside training templates
    assert {(x.category, x.question_index) for x in parts["heldout_names"]} <= t_train
    ex, used = training_examples(cfg, parts["train"])
    assert len(ex) == 80 and all(x.context_condition == "ambig" for x in used)
    assert all(e.target == x.target_loc for e, x in zip(ex, used))  # the stereotyped answer
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    _, used2 = training_examples(cfg, organism_split(cfg, shuffled)["train"])
    assert [_key(x) for x in used] == [_key(x) for x in used2]  # the same items from any order


def test_disambig_share_mixes_correct_answers():
    from excise.organisms.biased_bbq import BiasedConfig, organism_split, training_examples

    cfg = BiasedConfig(categories=["Age"], steps=10, disambig_share=0.25)
    ex, used = training_examples(cfg, organism_split(cfg)["train"])
    dis = [(e, x) for e, x in zip(ex, used) if x.context_condition == "disambig"]
    assert len(dis) == 20 and all(e.target == x.label for e, x in dis)


def test_workflow_pools_never_hold_organism_items():
    from excise.organisms.biased_bbq import BiasedConfig, organism_split, training_examples
    from excise.recipes.bbq_debias import BBQDebiasConfig, workflow_items

    bc = BiasedConfig(categories=["Age", "SES"], steps=20)
    cfg = BBQDebiasConfig(model="biased", biased=bc, per_category=16, pairs_per_category=6, finetune_per_category=8,
                          finetune_on="both")
    assert cfg.categories == ["Age", "SES"]
    data = workflow_items(cfg)
    parts = organism_split(bc)
    used = {_key(x) for x in training_examples(bc, parts["train"])[1]}
    held = {_key(x) for x in parts["heldout_templates"]}
    names = {_key(x) for x in parts["heldout_names"]}
    for name, pool in data.items():
        assert not ({_key(x) for x in pool} & used), name
    assert {_key(x) for x in data["eval"]} <= held
    assert not ({_key(x) for x in data["pairs"] + data["finetune"]} & (held | names))
    assert {x.context_condition for x in data["finetune"]} == {"ambig", "disambig"}
    assert not ({_key(x) for x in data["pairs"]} & {_key(x) for x in data["finetune"]})


def test_check_unused_refuses_a_leak(tmp_path):
    from excise.io import atomic_write_json
    from excise.organisms.biased_bbq import check_unused
    from excise.tasks.bbq import load_bbq

    x = load_bbq(["Age"], limit_per_category=3)
    atomic_write_json(tmp_path / "organism.json", {"train_example_ids": [[x[1].category, x[1].example_id]]})
    check_unused(tmp_path, {"eval": [x[0], x[2]]})
    with pytest.raises(ExciseError, match="used to build the organism"):
        check_unused(tmp_path, {"eval": x})


def test_attribution_measures_on_other_pairs_than_it_selects():
    from excise.locate.heads import HeadAttributionConfig, attribute_heads
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    att = attribute_heads(h, _pairs(8), HeadAttributionConfig(n_candidates=2, batch_size=16))
    assert att.n_pairs == 4 and att.meta["n_measure_pairs"] == 4 and att.meta["split"]
    with pytest.raises(ExciseError, match=">= 6"):
        attribute_heads(h, _pairs(5), HeadAttributionConfig(n_candidates=2))
    att2 = attribute_heads(h, _pairs(5), HeadAttributionConfig(n_candidates=2, split=False))
    assert att2.n_pairs == 5


@pytest.mark.parametrize("kind", ["head", "mlp"])
def test_causal_truth_and_localizer_scores(kind):
    from excise.locate.causal_truth import ablation_truth, cheap_views, random_scores, score_against_truth
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    items = _pairs(8)
    t = ablation_truth(h, items, kind, batch_size=16)
    n_units = 8 if kind == "head" else 2
    assert t.effects.shape == (8, n_units) and np.isfinite(t.effects).all()
    assert len(t.rows()) == n_units and t.rows()[0]["effect"] == pytest.approx(t.means.max())
    k = 2 if kind == "head" else 1
    perfect = score_against_truth(t.means, t, k=k, n_boot=200)
    assert perfect["precision_at_k"].value == 1.0 and perfect["spearman"].value == pytest.approx(1.0)
    worst = score_against_truth(-t.means, t, k=k, n_boot=200)
    assert worst["precision_at_k"].value == 0.0 and worst["spearman"].value == pytest.approx(-1.0)
    assert perfect["chance_precision"] == k / n_units
    views = cheap_views(h, items, kind, batch_size=16)
    assert set(views) == {"correlation", "attribution_patching", "activation_norm"}
    assert all(v.shape == (n_units,) for v in views.values())
    # attribution patching is a first-order estimate of the measured effect (on the same kind of items)
    if kind == "head":
        assert np.corrcoef(views["attribution_patching"], t.means)[0, 1] > 0.5
    assert random_scores(n_units, 0).shape == (n_units,)
    with pytest.raises(ValueError, match="scores for"):
        score_against_truth(np.zeros(n_units + 1), t)


def _tiny_study(tmp_path, monkeypatch, **over):
    from excise.intervene.lora import FinetuneConfig
    from excise.locate.heads import HeadAttributionConfig
    from excise.organisms.biased_bbq import BiasedConfig
    from excise.recipes.bbq_study import BBQStudyConfig, RelearnSweep
    from excise.testing import save_tiny

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    base = save_tiny("llama", tmp_path / "tiny")
    settings = dict(
        biased=BiasedConfig(base=str(base), categories=["Age", "SES"], steps=2, batch_size=4),
        per_category=8, names_per_category=4, truth_per_category=2, pairs_per_category=6, finetune_per_category=4,
        k=2, k_mlp=1, n_heads=2, localize=HeadAttributionConfig(n_candidates=2, batch_size=16),
        finetune=FinetuneConfig(steps=2, batch_size=4, lr=1e-3),
        relearn=RelearnSweep(lrs=[1e-3, 1e-4], seeds=[0, 1], steps=2, eval_every=1, n_items=8, eval_per_category=4),
        batch_size=16, n_boot=100)
    settings.update(over)
    return BBQStudyConfig(**settings)


def test_study_end_to_end_on_a_tiny_organism(tmp_path, monkeypatch):
    from excise.io import read_json
    from excise.recipes.bbq_study import run_study

    cfg = _tiny_study(tmp_path, monkeypatch)
    s = run_study(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for f in ("organism/items.json", "generalization/organism_templates/bias_scores.json",
              "generalization/base_names/predictions.jsonl", "truth_organism/truth_head.csv",
              "truth_base/truth_mlp.csv", "localize/heads.csv", "cond_prune/predictions.jsonl",
              "cond_random_finetune/metrics.json", "relearn_base/metrics.json", "report/study.md",
              "report/localizers.csv", "report/mitigation.csv", "report/relearn.csv", "report.html"):
        assert (d / f).exists(), f
    loc = read_json(d / "localize" / "metrics.json")
    assert len(loc["heads"]) == 2 and len(loc["random_heads"]) == 2
    assert not ({tuple(h) for h in loc["heads"]} & {tuple(h) for h in loc["random_heads"]})
    cond = read_json(d / "cond_finetune" / "metrics.json")
    assert cond["pruned_heads"] == [] and "finetune" in cond
    # lr sweep at seed 0 plus the repeated seeds at the first lr; each curve starts at step 0
    runs = {(r["lr"], r["seed"]) for r in cond["relearn"]}
    assert runs == {(1e-3, 0), (1e-3, 1), (1e-4, 0)}
    assert all(r["curve"][0]["step"] == 0 for r in cond["relearn"])
    # the relearning runs start from the same mitigated weights
    assert len({round(r["curve"][0]["s_amb"], 9) for r in cond["relearn"]}) == 1
    assert "build_seconds" in s and "localized_beats_random" in s
    text = (d / "report" / "study.md").read_text()
    assert "Relearning attack" in text and "precision@k" in text
    # items the organism was built from are in no pool but the attacker's
    items = read_json(d / "organism" / "items.json")
    from excise.organisms.biased_bbq import used_ids
    from excise.organisms.biased_bbq import build_biased

    used = used_ids(build_biased(cfg.biased))
    for name, ids in items.items():
        if name != "attack":
            assert not ({(c, i) for c, i in ids} & used), name
    assert {(c, i) for c, i in items["attack"]} <= used
    # resume: every stage is skipped
    s2 = run_study(cfg, tmp_path / "run")
    assert s2["build_seconds"] == s["build_seconds"]
