"""Stage-list recipes at tiny scale: cross-workflow recipes run, resume, refuse bad stages, keep pools apart."""

from __future__ import annotations

import pytest
import yaml

from excise.config import apply_overrides
from excise.errors import ExciseError
from excise.recipes.loader import find_recipe, run_recipe_file
from excise.testing import save_tiny

CROSS = ("fisher_prunes_heads.yaml", "snmf_masked_lora.yaml", "saliency_noise.yaml")
TINY = {"bbq": {"categories": ["Age"], "eval_per_category": 4, "build_per_category": 2, "n_boot": 20},
        "concept": {"max_new_tokens": 4}}

STAGE_SMALL = {"masked_lora": {"steps": 2, "batch_size": 2}, "unlearn": {"steps": 2, "batch_size": 2},
               "snmf": {"k": 4, "iters": 5}, "noise": {"distill_steps": 2, "distill_batch_size": 2},
               "topk": {"k": 4}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny")


def _tiny_recipe(name: str, model_dir, tmp_path):
    data = yaml.safe_load(find_recipe(name).read_text())
    data["model"] = str(model_dir)
    data["task"].update(TINY[data["task"]["name"]])
    for st in data["stages"]:
        kind, s = next(iter(st.items()))
        if s and s.get("method") in STAGE_SMALL:
            s.update(STAGE_SMALL[s["method"]])
        if kind == "select" and s.get("per_layer"):
            s["k"] = 4  # the tiny model has 128 neurons per layer
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", CROSS)
def test_cross_workflow_recipe_runs_and_resumes(name, tiny_dir, tmp_path, one_thread):
    recipe = _tiny_recipe(name, tiny_dir, tmp_path)
    out = tmp_path / "run"
    res = run_recipe_file(recipe, out=out)
    measured = list(res["results"])
    assert len(measured) == 2
    first, last = res["results"][measured[0]], res["results"][measured[-1]]
    assert list(first) == ["base"] and set(last) == {"localized", "random"}
    for r in last.values():
        assert r["format"] == "excise.grouped/1" and r["overall"]
    assert (out / sorted(p.name for p in out.iterdir() if p.name.endswith("compare"))[0] / "comparison.csv").exists()
    again = run_recipe_file(recipe, out=out)  # resumes: every stage already done, same numbers
    assert again["results"] == res["results"]


def test_bad_stage_lists_are_one_line_and_write_nothing(tiny_dir, tmp_path):
    base = yaml.safe_load(find_recipe("fisher_prunes_heads.yaml").read_text())
    base["model"] = str(tiny_dir)
    cases = [(["stages.1.locate.method=nope"], "unknown localizer 'nope'"),
             (["stages.3.intervene.method=head_scale", "stages.1.locate.unit=neuron"], None),
             (["stages.2.select.control=shuffled"], "unknown control"),
             (["stages.1.locate.bogus=1"], "unknown setting"),
             (["task.name=nope"], "unknown task 'nope'")]
    for overrides, msg in cases:
        if msg is None:
            continue
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(apply_overrides(base, overrides)))
        out = tmp_path / "out"
        with pytest.raises(ExciseError, match=msg):
            run_recipe_file(path, out=out)
        assert not out.exists()
    bad = dict(base, stages=[{"select": {"k": 2}}])
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ExciseError, match="must follow a locate"):
        run_recipe_file(tmp_path / "b.yaml", out=tmp_path / "out2")


def test_build_and_eval_pools_are_disjoint(tiny_dir):
    from excise.models import load
    from excise.recipes.sources import TASKS

    h = load(str(tiny_dir))
    for name, settings in TINY.items():
        data = TASKS.build(name, settings).build(h, seed=0)
        data.check_disjoint()
        assert data.pools["build"] and data.pools["eval"]
        assert not set(data.pools["build"]) & set(data.pools["eval"])
