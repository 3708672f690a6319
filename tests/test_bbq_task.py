"""BBQ loading: every category, strict validation, metadata join, target derivation, sampling, HF datasets."""

import json
import shutil
from collections import Counter

import pytest

from excise.errors import ExciseError
from excise.tasks import bbq
from excise.tasks.bbq import CATEGORIES, load_bbq, load_bbq_hf, load_jsonl, packaged_bbq_dir, sample_bbq
from excise.tasks.bbq_items import derive_target, load_metadata, load_templates


@pytest.fixture(scope="module")
def all_items():
    return load_bbq()


def _first_lines(cat, n=8):
    with (packaged_bbq_dir() / f"{cat}.jsonl").open() as f:
        return [next(f) for _ in range(n)]


def test_all_categories_load_with_targets(all_items):
    c = Counter(x.category for x in all_items)
    assert set(c) == set(CATEGORIES)
    assert len(all_items) == 58492
    src = Counter(x.target_source for x in all_items)
    # 16 Gender_identity rows have target_loc NA in the metadata file (both entities stereotyped)
    assert src["metadata"] == 58476 and src[""] == 16
    assert {x.label_type for x in all_items} == {"name", "label"}
    x = all_items[0]
    assert x.category == "Age" and x.example_id == 0 and x.target_loc == 0 and x.unknown_index == 2
    nonneg = next(x for x in all_items if x.category == "Age" and x.example_id == 2)
    # non-negative question: the biased answer is the non-stereotyped entity (grandson)
    assert nonneg.question_polarity == "nonneg" and nonneg.target_loc == 1 and nonneg.stereotyped_index == 0


def test_target_derivation_matches_metadata_in_every_category(all_items):
    """The R-script derivation (jsonl answer_info + stereotyped_groups, templates for the intersectional
    categories) against additional_metadata.csv, on every row that the file gives a target."""
    templates = load_templates(packaged_bbq_dir() / "templates")
    n, agree, mismatches = Counter(), Counter(), []
    for x in all_items:
        if x.target_source != "metadata":
            continue
        loc, lt = derive_target(x, templates)
        n[x.category] += 1
        if (loc, lt) == (x.target_loc, x.label_type):
            agree[x.category] += 1
        else:
            mismatches.append((x.category, x.example_id, x.question_polarity, x.answer_info, x.stereotyped_groups,
                               (x.target_loc, x.label_type), (loc, lt)))
    for m in mismatches[:50]:
        print("MISMATCH", m)
    for cat in CATEGORIES:
        rate = agree[cat] / n[cat]
        print(f"{cat}: {agree[cat]}/{n[cat]} = {rate:.5f}")
        assert n[cat] > 500 and rate >= 0.999, cat
    assert sum(agree.values()) / sum(n.values()) >= 0.999


def test_derivation_used_when_no_metadata_file(tmp_path):
    shutil.copy(packaged_bbq_dir() / "Religion.jsonl", tmp_path / "Religion.jsonl")
    derived = load_bbq(["Religion"], data_dir=tmp_path)
    joined = {x.example_id: x for x in load_bbq(["Religion"])}
    assert {x.target_source for x in derived} == {"derived"}
    assert sum(x.target_loc == joined[x.example_id].target_loc for x in derived) == len(derived) == 1200


def test_unknown_category_and_missing_file(tmp_path):
    with pytest.raises(ExciseError, match="unknown BBQ category 'Height'"):
        load_bbq(["Height"])
    with pytest.raises(ExciseError, match="Age.jsonl: file not found"):
        load_bbq(["Age"], data_dir=tmp_path)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("label"), "label"),
    (lambda r: r.update(label=3), "label"),
    (lambda r: r.update(context_condition="vague"), "context_condition"),
    (lambda r: r.update(question_polarity="pos"), "question_polarity"),
    (lambda r: r.update(ans1=5), "ans1"),
    (lambda r: r.update(example_id="x7"), "example_id"),
    (lambda r: r["answer_info"].update(ans0=["x"]), "answer_info"),
    (lambda r: r["answer_info"].update(ans2=["Someone", "old"]), "answer_info"),  # no unknown option
    (lambda r: r.update(target_loc=2), "target_loc"),  # points at the unknown option
])
def test_malformed_rows_name_file_line_field(tmp_path, mutate, field):
    lines = _first_lines("Age", 3)
    row = json.loads(lines[1])
    mutate(row)
    p = tmp_path / "Age.jsonl"
    p.write_text(lines[0] + json.dumps(row) + "\n" + lines[2])
    with pytest.raises(ExciseError) as e:
        load_jsonl(p)
    assert str(e.value).startswith(f"{p}:2:{field}:"), str(e.value)


def test_invalid_json_and_bad_metadata(tmp_path):
    p = tmp_path / "Age.jsonl"
    p.write_text(_first_lines("Age", 1)[0] + "{not json\n")
    with pytest.raises(ExciseError, match=r"Age.jsonl:2: invalid JSON"):
        load_jsonl(p)
    m = tmp_path / "additional_metadata.csv"
    m.write_text('"category","question_index","example_id","target_loc","label_type"\n"Age","1",0,1,"label"\n"Age","1",1,7,"label"\n')
    with pytest.raises(ExciseError, match=r"additional_metadata.csv:3:target_loc"):
        load_metadata(m)


def test_sampling_is_stratified_and_seeded(all_items):
    s = sample_bbq(all_items, 20, seed=3)
    assert len(s) == 20 * len(CATEGORIES)
    cells = Counter((x.category, x.context_condition, x.question_polarity) for x in s)
    assert set(cells.values()) == {5} and len(cells) == 44
    assert [x.example_id for x in s] == [x.example_id for x in sample_bbq(all_items, 20, seed=3)]
    assert [x.example_id for x in s] != [x.example_id for x in sample_bbq(all_items, 20, seed=4)]
    # odd n: cells differ by at most one
    c7 = Counter((x.context_condition, x.question_polarity) for x in sample_bbq(all_items, 7, seed=0) if x.category == "SES")
    assert sum(c7.values()) == 7 and max(c7.values()) - min(c7.values()) <= 1
    # a cell that runs dry gives its share to the others
    few = [x for x in all_items if x.category == "Religion"]
    few = [x for x in few if not (x.context_condition == "ambig" and x.question_polarity == "neg")][:40] + \
        [x for x in few if x.context_condition == "ambig" and x.question_polarity == "neg"][:2]
    assert len(sample_bbq(few, 30, seed=0)) == 30
    with pytest.raises(ExciseError):
        sample_bbq(all_items, 0)


def test_hugging_face_dataset_from_disk_and_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(l) for l in _first_lines("Age", 8) + _first_lines("Religion", 4)]
    rx = [json.loads(l) for l in _first_lines("Race_x_gender", 40)]
    d = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
    d.save_to_disk(str(tmp_path / "bbq_ds"))
    items = load_bbq_hf(str(tmp_path / "bbq_ds"), metadata=packaged_bbq_dir() / "additional_metadata.csv")
    assert len(items) == 12 and {x.target_source for x in items} == {"metadata"}
    ref = {(x.category, x.example_id): x.target_loc for x in load_bbq(["Age", "Religion"], limit_per_category=8)}
    assert all(ref[(x.category, x.example_id)] == x.target_loc for x in items)
    only = load_bbq_hf(str(tmp_path / "bbq_ds"), split="test", categories=["Religion"])
    assert len(only) == 4 and {x.target_source for x in only} == {"derived"}
    jl = tmp_path / "bbq.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows + rx))
    from_jsonl = load_bbq_hf(str(jl))
    assert len(from_jsonl) == 52 and {x.target_source for x in from_jsonl} == {"derived"}
    # derived targets (packaged templates for the intersectional category) equal the metadata file's
    ref.update({(x.category, x.example_id): x.target_loc for x in load_bbq(["Race_x_gender"], limit_per_category=40)})
    assert all(ref[(x.category, x.example_id)] == x.target_loc for x in from_jsonl)
    bad = dict(rows[0])
    bad.pop("question")
    jl.write_text(json.dumps(rows[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ExciseError, match=r"\[train\]:1:question"):
        load_bbq_hf(str(jl))
    with pytest.raises(ExciseError, match="no split 'dev'"):
        load_bbq_hf(str(tmp_path / "bbq_ds"), split="dev")
