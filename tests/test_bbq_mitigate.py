"""BBQ mitigation workflow: held-out split, planted-head masks, before/after table, end to end on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from excise.errors import ExciseError


@pytest.fixture(scope="module")
def bbq_items():
    from excise.tasks.bbq import load_bbq

    return load_bbq(["Age", "SES"])


def test_split_is_by_template_seeded_and_disjoint(bbq_items):
    from excise.tasks.bbq import split_items

    train, held = split_items(bbq_items, 0.5, seed=0)
    assert len(train) + len(held) == len(bbq_items) and train and held
    t_keys = {(x.category, x.question_index) for x in train}
    h_keys = {(x.category, x.question_index) for x in held}
    assert not t_keys & h_keys  # no template on both sides
    again, _ = split_items(list(reversed(bbq_items)), 0.5, seed=0)
    assert {id(x) for x in again} == {id(x) for x in train}  # order-independent
    other, _ = split_items(bbq_items, 0.5, seed=1)
    assert {id(x) for x in other} != {id(x) for x in train}


def test_unlearning_rows_before_after():
    from excise.recipes.bbq_report import summarize, unlearning_rows

    def e(v, lo, hi, n):
        return {"value": v, "lo": lo, "hi": hi, "n": n}

    def rep(s_amb):
        g = {"s_amb": e(s_amb, s_amb - 0.1, s_amb + 0.1, 40), "s_dis": e(0.1, 0.0, 0.2, 40),
             "acc_ambig": e(0.5, 0.4, 0.6, 40), "acc_disambig": e(0.6, 0.5, 0.7, 40)}
        return {"overall": g, "groups": {"Age": g}}

    rows = unlearning_rows(rep(0.4), rep(0.1))
    assert len(rows) == 8
    r = next(r for r in rows if r["group"] == "Age" and r["metric"] == "s_amb")
    assert r["before"] == 0.4 and r["after"] == 0.1 and math.isclose(r["change"], -0.3)
    s = summarize("m", rep(0.4)["overall"], rep(0.1)["overall"], {}, {"pruned_heads": [[1, 2]], "head_scale": 0.2}, {})
    assert math.isclose(s["s_amb_drop_pct"], 75.0) and s["s_amb_ci_excludes_0_before"] is True
    # an undefined "before" score gives an undefined drop, never 0
    und = rep(0.4)
    und["overall"]["s_amb"] = {"value": None, "lo": None, "hi": None, "n": 0}
    s2 = summarize("m", und["overall"], rep(0.1)["overall"], {}, {}, {})
    assert math.isnan(s2["s_amb_drop_pct"]) and s2["s_amb_ci_excludes_0_before"] is False


def test_planted_masks_cover_only_the_heads():
    from excise.organisms.planted import head_grad_masks
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    masks = head_grad_masks(h, [(1, 2)], "qo")
    d = h.anatomy.head_dim
    o = masks["model.layers.1.self_attn.o_proj.weight"]
    q = masks["model.layers.1.self_attn.q_proj.weight"]
    assert o.sum() == o.shape[0] * d and o[:, 2 * d:3 * d].all()
    assert q.sum() == q.shape[1] * d and q[2 * d:3 * d].all()
    with pytest.raises(ExciseError, match="out of range"):
        head_grad_masks(h, [(5, 0)])


def test_planted_kv_masks_take_whole_groups_only():
    """qkvo adds the key/value rows of the heads' group; a partial group is refused (it would change
    query heads outside the planted set)."""
    from excise.organisms.planted import head_grad_masks
    from excise.testing import tiny_handle

    h = tiny_handle("llama")  # 4 query heads, 2 key/value heads: groups {0, 1} and {2, 3}
    d = h.anatomy.head_dim
    masks = head_grad_masks(h, [(1, 2), (1, 3)], "qkvo")
    for name in ("k_proj", "v_proj"):
        m = masks[f"model.layers.1.self_attn.{name}.weight"]
        assert m[d:2 * d].all() and m.sum() == d * m.shape[1]  # key/value head 1 only
    assert masks["model.layers.1.self_attn.q_proj.weight"].sum() == 2 * d * h.anatomy.d_model
    with pytest.raises(ExciseError, match=r"whole groups"):
        head_grad_masks(h, [(1, 2)], "qkvo")
    from pydantic import ValidationError

    from excise.organisms.planted import PlantedConfig

    with pytest.raises(ValidationError, match="independent"):  # a group cannot be planted head by head
        PlantedConfig(params="qkvo", independent=True)


def test_split_defaults_to_template_or_the_planted_models_own():
    from excise.recipes.bbq_debias import BBQDebiasConfig

    assert BBQDebiasConfig().split_by == "template"
    planted = BBQDebiasConfig(model="planted")
    assert planted.split_by == planted.planted.split_by == "names"
    assert BBQDebiasConfig(model="planted", split_by="template").split_by == "template"  # an explicit choice wins


def test_config_rejects_unknown_settings():
    from excise.config import validate
    from excise.recipes.bbq_debias import BBQDebiasConfig

    with pytest.raises(ExciseError, match="bbq.yaml:head_scael"):
        validate(BBQDebiasConfig, {"head_scael": 0.1}, "bbq.yaml")
    with pytest.raises(ExciseError, match="head_scale"):
        validate(BBQDebiasConfig, {"head_scale": 2.0}, "bbq.yaml")


def test_workflow_end_to_end_on_tiny_model(tmp_path):
    """All stages on a tiny llama: files written, reload identical, base weights untouched, resume."""
    from excise.io import read_json
    from excise.recipes.bbq_debias import BBQDebiasConfig, load_mitigated, run_bbq
    from excise.locate.heads import HeadAttributionConfig
    from excise.intervene.lora import FinetuneConfig
    from excise.testing import tiny_handle

    cfg = BBQDebiasConfig(model="tiny", categories=["Age"], per_category=8, pairs_per_category=6,
                          finetune_per_category=4, localize=HeadAttributionConfig(n_candidates=2),
                          finetune=FinetuneConfig(steps=2, batch_size=2, lr=1e-3), trace_items=2, n_boot=100)
    s = run_bbq(cfg, tmp_path / "run", load_base=lambda: tiny_handle("llama"))
    d = tmp_path / "run"
    for f in ("eval_before/bias_scores.json", "eval_before/predictions.jsonl", "localize/heads.csv",
              "localize/heads_ablation.png", "localize/attention_heads_before.png", "localize/hidden_norms_before.png",
              "localize/mlp_out_norms_before.png", "mitigate/model/head_scales.safetensors",
              "mitigate/model/adapter/adapter_config.json", "eval_after/bias_scores.json",
              "eval_after/attention_heads_after.png", "report/unlearning_results.csv", "report/summary.txt"):
        assert (d / f).exists(), f
    assert s["reload_max_abs_diff"] == 0.0
    assert s["base_weights_max_change"] == 0.0
    assert len(s["pruned_heads"]) == 3
    mh = load_mitigated(d / "mitigate" / "model", base_handle=tiny_handle("llama"))
    assert mh.extra["head_scales"].values.min() == pytest.approx(0.2)
    # a second call resumes every stage
    s2 = run_bbq(cfg, tmp_path / "run", load_base=lambda: tiny_handle("llama"))
    assert s2["after"] == s["after"]
    assert read_json(d / "report" / "summary.json")["after"] == s["after"]


@pytest.mark.parametrize("split_by", ["template", "names"])
def test_planted_training_items_are_never_evaluated(split_by):
    from excise.recipes.bbq_debias import BBQDebiasConfig, planted_config, workflow_items
    from excise.organisms.planted import train_items

    cfg = BBQDebiasConfig(model="planted", categories=["Age", "SES"], per_category=40, split_by=split_by, seed=3)
    pc = planted_config(cfg)
    assert pc.split_by == split_by and pc.seed == 3
    pc = pc.model_copy(update={"categories": ["Age", "SES"]})
    train = {(x.category, x.example_id) for x in train_items(pc)}
    data = workflow_items(cfg)
    held = {(x.category, x.example_id) for x in data["eval"]}
    assert train and held and not train & held
    if split_by == "template":
        assert not {(c, x.question_index) for x in data["eval"] for c in [x.category]} & \
            {(x.category, x.question_index) for x in train_items(pc)}


def test_packaged_recipe_validates():
    from excise.config import load_yaml, validate
    from excise.recipes.bbq_debias import BBQDebiasConfig
    from excise.recipes.loader import WORKFLOWS, find_recipe

    path = find_recipe("recipes/bbq_debias.yaml")
    data = load_yaml(path)
    assert WORKFLOWS[data.pop("workflow")] == "excise.recipes.bbq_debias"
    data.pop("out")
    cfg = validate(BBQDebiasConfig, data, str(path))
    assert cfg.select.k == 3 and cfg.head_scale == 0.2 and cfg.finetune.method == "lora"
