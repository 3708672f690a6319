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
