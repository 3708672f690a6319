"""GroupedResult (one result type for every evaluator) and dotted --set overrides."""

from __future__ import annotations

import json
import math

import pytest

from excise.config import apply_overrides
from excise.errors import ExciseError
from excise.measure.frame import GroupedResult, compare
from excise.measure.stats import wilson


def _frame():
    values = {"correct": [1, 1, 1, 0, 0, 0, 1, 0], "score": [0.5, 0.2, 0.9, 0.1, 0.4, 0.3, 0.8, 0.6]}
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    return GroupedResult.from_items(values, groups, group_by="category", seed=0)


def test_overall_by_group_and_difference():
    f = _frame()
    assert f["correct"] == wilson(4, 8)
    assert f.group("a")["correct"] == wilson(3, 4)
    assert f.group("b")["correct"] == wilson(1, 4)
    d = f.difference("correct")
    assert d.value == pytest.approx(0.5) and d.n == 4 and "a - b" in d.method
    assert d.lo <= d.value <= d.hi
    assert f["score"].method == "mean-t"  # not 0/1: a t interval
    assert _frame().as_dict() == f.as_dict()  # same seed, same CI


def test_undefined_group_is_nan_never_zero():
    f = GroupedResult.from_items({"x": [1.0, 0.0]}, ["a", "a"])
    assert not f.difference("x").defined and f.difference("x").n == 0
    empty = GroupedResult.from_items({"x": []}, [])
    assert math.isnan(empty["x"].value) and empty["x"].n == 0


def test_roundtrip_and_files(tmp_path):
    f = _frame()
    paths = f.save(tmp_path, "before")
    back = GroupedResult.from_dict(json.loads(paths[0].read_text()))
    assert back.as_dict() == json.loads(json.dumps(f.as_dict()))
    csv = paths[1].read_text().splitlines()
    assert csv[0] == "scope,metric,value,lo,hi,n,method"
    assert any(line.startswith("category=a,correct,0.75") for line in csv)
    undefined = GroupedResult.from_items({"x": [1.0]}, ["a"])
    undefined.save(tmp_path, "u")
    assert "difference,x,,,,0," in (tmp_path / "u.csv").read_text()  # empty cells, not 0
    rows = compare(f, f)
    assert {r["scope"] for r in rows} == {"overall", "category=a", "category=b", "difference"}
    assert all(r["before_value"] == r["after_value"] or math.isnan(r["before_value"]) for r in rows)


def test_overrides_set_nested_keys_and_list_items():
    data = {"finetune": {"lora": {"r": 8}}, "stages": [{"locate": {"method": "fisher"}}, {"select": {"k": 3}}]}
    out = apply_overrides(data, ["finetune.lora.r=16", "stages.1.select.k=5", "categories=[Age, SES]",
                                 "seed=null", "new.key=x"])
    assert out["finetune"]["lora"]["r"] == 16 and out["stages"][1]["select"]["k"] == 5
    assert out["categories"] == ["Age", "SES"] and out["seed"] is None and out["new"] == {"key": "x"}
    assert data["finetune"]["lora"]["r"] == 8  # the input is not mutated


@pytest.mark.parametrize("bad, msg", [("novalue", "KEY.PATH=VALUE"), ("stages.9.k=1", "no list item"),
                                      ("finetune.lora.r.x=1", "cannot set a key inside"), ("a=[", "cannot parse")])
def test_bad_overrides_are_one_line(bad, msg):
    with pytest.raises(ExciseError, match=msg):
        apply_overrides({"stages": [], "finetune": {"lora": {"r": 8}}}, [bad])


def test_every_evaluator_gives_a_grouped_result():
    """BBQ bias scores, concept measures and arithmetic accuracy all convert to the one result type."""
    from excise.measure.arithmetic import accuracy_frame
    from excise.measure.bbq import bias_scores
    from excise.measure.unlearning import frame as concept_frame
    from excise.organisms.arithmetic import ArithModelConfig, WordDigitTokenizer, build_model
    from excise.tasks.arithmetic import OPS, eval_items

    rows = []
    for i in range(40):
        cond = "ambig" if i % 2 else "disambig"
        rows.append({"category": "Age" if i < 20 else "SES", "label_type": "label", "context_condition": cond,
                     "label": 2 if cond == "ambig" else i % 3, "pred": i % 3, "target_loc": (i // 2) % 2,
                     "unknown_loc": 2})
    bbq = bias_scores(rows, n_boot=50).frame()
    assert isinstance(bbq, GroupedResult) and set(bbq.by_group) == {"Age", "SES"}
    assert bbq["s_amb"].n > 0 and "acc_aligned - acc_conflicting" in bbq.differences

    res = {"metrics": {"answer_prob.paraphrase": {"value": 0.5, "lo": 0.4, "hi": 0.6, "n": 3},
                       "answer_prob.direct": {"value": 0.9, "lo": 0.8, "hi": 1.0, "n": 3}},
           "items": [{"set": "direct", "leak": 1}, {"set": "paraphrase", "leak": 0}, {"set": "adv_roleplay", "leak": 1},
                     {"set": "retain", "correct": 1, "group": "neighbour"}, {"set": "retain", "correct": 0, "group": None}]}
    concept = concept_frame(res)
    assert concept["leak.heldout"] == wilson(1, 2)  # the direct probes (build items) are left out
    assert "answer_prob.direct" not in concept.overall and "probe:direct" not in concept.by_group
    assert concept.group("retain:neighbour")["retain_accuracy"] == wilson(1, 1)

    tok = WordDigitTokenizer(numbers=True)
    model = build_model(ArithModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64), tok.vocab_size, seed=0)
    items = eval_items(OPS, 3, seed=0)
    arith = accuracy_frame(model, tok, items, n_boot=50)
    assert set(arith.by_group) == set(OPS) and arith["accuracy"].n == len(items)
    assert arith["accuracy.forget"].n == 6 and "accuracy.retain - accuracy.forget" in arith.differences
