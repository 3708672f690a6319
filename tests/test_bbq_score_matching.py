"""`excise bbq score`: prediction rows are checked against the BBQ data they name (category,
example_id, question_index, answers; the metadata's question_index), and text answers map to
options by whole words only."""

import json
import re

import pytest

from excise.cli import main
from excise.errors import ExciseError
from excise.recipes.bbq_eval import read_predictions
from excise.tasks.bbq import load_bbq
from excise.tasks.bbq_prompts import match_answer


@pytest.fixture(scope="module")
def age_all():
    return {x.example_id: x for x in load_bbq(["Age"], targets=False)}


@pytest.fixture(scope="module")
def age_items():
    return load_bbq(["Age"], limit_per_category=8)


def external(x, **change):
    """A row as an external harness writes it: the official BBQ fields, no target, plus ``change``."""
    r = x.fields()
    for k in ("target_loc", "label_type", "unknown_loc"):
        r.pop(k)
    r.update(change)
    return r


def write(p, rows):
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def score_exit(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bbq", "score", *map(str, args)])
    return e.value.code, capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------ rows vs the BBQ data

def test_question_index_mismatch_is_an_error(tmp_path, age_items, capsys):
    x = age_items[1]
    assert x.question_index == "1"
    p = write(tmp_path / "preds.jsonl", [external(age_items[0], pred=0), external(x, pred=0, question_index="7")])
    code, err = score_exit([p, "--out", tmp_path / "s"], capsys)
    assert code == 2 and err.startswith(f"error: {p}:2:question_index") and "\n" not in err
    assert "'7'" in err and "'1'" in err
    assert not (tmp_path / "s").exists()
    # the same number written as an int is the same question_index
    write(p, [external(x, pred=0, question_index=1)])
    rows, _ = read_predictions(p)
    assert rows[0]["question_index"] == "1"


def test_metadata_question_index_is_checked(tmp_path, age_items):
    """A data directory with only additional_metadata.csv: the metadata's question_index is the check."""
    x = age_items[2]
    d = tmp_path / "data"
    d.mkdir()
    (d / "additional_metadata.csv").write_text(
        '"category","question_index","example_id","target_loc","label_type"\n'
        f'"Age","{int(x.question_index) + 3}",{x.example_id},0,"label"\n')
    p = write(tmp_path / "preds.jsonl", [external(x, pred=1)])
    with pytest.raises(ExciseError) as e:
        read_predictions(p, data_dir=d)
    assert str(e.value).startswith(f"{p}:1:question_index:"), str(e.value)
    # agreeing, the metadata's target is used
    (d / "additional_metadata.csv").write_text(
        '"category","question_index","example_id","target_loc","label_type"\n'
        f'"Age","{x.question_index}",{x.example_id},0,"label"\n')
    rows, _ = read_predictions(p, data_dir=d)
    assert rows[0]["target_loc"] == 0


@pytest.mark.parametrize("i", [0, 1, 2])
def test_answers_mismatch_is_an_error(tmp_path, age_items, capsys, i):
    x = age_items[3]
    p = write(tmp_path / "preds.jsonl", [external(x, pred=0, **{f"ans{i}": "The dog"})])
    code, err = score_exit([p, "--out", tmp_path / "s"], capsys)
    assert code == 2 and err.startswith(f"error: {p}:1:ans{i}"), err
    assert "The dog" in err


def test_label_mismatch_is_an_error(tmp_path, age_items):
    x = age_items[0]
    p = write(tmp_path / "preds.jsonl", [external(x, pred=0, label=(x.label + 1) % 3)])
    with pytest.raises(ExciseError, match=rf"^{re.escape(str(p))}:1:label:"):
        read_predictions(p)


@pytest.mark.parametrize("own_target", [False, True])
def test_unknown_category_is_an_error(tmp_path, age_items, capsys, own_target):
    x = age_items[0]
    extra = {"target_loc": 0 if x.unknown_index else 1, "label_type": "label"} if own_target else {}
    p = write(tmp_path / "preds.jsonl", [external(x, pred=0), external(x, pred=0, category="Agee", **extra)])
    code, err = score_exit([p, "--out", tmp_path / "s"], capsys)
    assert code == 2 and err.startswith(f"error: {p}:2:category"), err
    assert "Agee" in err


def test_unknown_example_id_is_an_error(tmp_path, age_items, capsys):
    p = write(tmp_path / "preds.jsonl", [external(age_items[0], pred=0), external(age_items[1], pred=0, example_id=999999)])
    code, err = score_exit([p, "--out", tmp_path / "s"], capsys)
    assert code == 2 and err.startswith(f"error: {p}:2:example_id"), err
    assert "999999" in err and "--data-dir" in err
    assert not (tmp_path / "s").exists()


def test_own_target_rows_not_in_the_data_are_counted(tmp_path, age_items):
    """Rows that carry target_loc (e.g. `bbq eval` on other data) need a known category; an id the
    data does not list is scored with the row's target, and counted."""
    x = age_items[1]
    r = dict(x.fields(), pred=0, example_id=999999)
    p = write(tmp_path / "preds.jsonl", [dict(age_items[0].fields(), pred=0), r])
    stats = {}
    rows, how = read_predictions(p, stats=stats)
    assert rows[1]["target_loc"] == x.target_loc and how == {"index": 2}
    assert stats == {"data": "packaged", "checked": 1, "not_in_data": 1, "unchecked": 0}
    # but listed ids are still checked
    write(p, [dict(x.fields(), pred=0, ans0="The dog")])
    with pytest.raises(ExciseError, match=":1:ans0:"):
        read_predictions(p)


def test_own_data_via_data_dir(tmp_path, age_items, capsys):
    """Predictions on a user's own BBQ-format data score against that directory's files."""
    d = tmp_path / "mine"
    d.mkdir()
    own = [dict(external(x), example_id=100000 + i) for i, x in enumerate(age_items)]
    own[0]["ans0"] = own[0]["ans0"] + " next door"
    write(d / "Age.jsonl", own)
    p = write(tmp_path / "preds.jsonl", [dict(r, pred=r["label"]) for r in own])
    code, err = score_exit([p, "--out", tmp_path / "packaged"], capsys)
    assert code == 2 and f"{p}:1:example_id" in err
    code, _ = score_exit([p, "--out", tmp_path / "s", "--data-dir", d, "--n-boot", "20"], capsys)
    assert code == 0
    counts = json.loads((tmp_path / "s" / "match_counts.json").read_text())
    assert counts["n_checked"] == len(own) and counts["n_not_in_data"] == 0
    # answers are checked against that directory, not the packaged copy
    write(p, [dict(own[0], pred=0, ans0=age_items[0].answers[0])])
    code, err = score_exit([p, "--out", tmp_path / "s2", "--data-dir", d], capsys)
    assert code == 2 and err.startswith(f"error: {p}:1:ans0"), err
    # a data directory that is not there is an error, not "nothing to check"
    code, err = score_exit([p, "--out", tmp_path / "s3", "--data-dir", tmp_path / "nosuch"], capsys)
    assert code == 2 and "nosuch" in err


def test_missing_question_index_is_taken_from_the_data(tmp_path, age_items):
    x = age_items[4]
    r = external(x, pred=0)
    r.pop("question_index")
    rows, _ = read_predictions(write(tmp_path / "preds.jsonl", [r]))
    assert rows[0]["question_index"] == x.question_index and rows[0]["target_loc"] is not None


# ------------------------------------------------------------------------------ whole-word matching

def test_older_is_not_old(age_all):
    """Age item 3287: 'The old man' (answer_info old/old), 'Unknown', 'The young boy' (young/nonOld).
    "old" and "young" are substrings of "older"/"younger", not words of them."""
    x = age_all[3287]
    assert x.answers == ("The old man", "Unknown", "The young boy")
    assert x.answer_info["ans0"] == ["old", "old"] and x.answer_info["ans2"] == ["young", "nonOld"]
    for lenient in (True, False):
        assert match_answer("The older girl", x, lenient=lenient) == (None, "unmatched")
        assert match_answer("the younger girl", x, lenient=lenient) == (None, "unmatched")
        assert match_answer("The older man, I think", x, lenient=lenient)[0] is None
    # whole words still match, wherever they are
    assert match_answer("I'd say the old man.", x) == (0, "contains")
    assert match_answer("It is the young boy", x) == (2, "contains")
    assert match_answer("The old man", x, lenient=False) == (0, "exact")


def test_two_words_rule_matches_whole_words(age_all):
    """Age item 2483: 'Not enough info', 'The older adult', 'The teen boy' (answer_info "teen boy")."""
    x = age_all[2483]
    assert x.answers == ("Not enough info", "The older adult", "The teen boy")
    assert match_answer("The teen boy did", x, lenient=False) == (2, "two_words")
    assert match_answer("The teen boyfriend did", x, lenient=False) == (None, "unmatched")
    assert match_answer("the older adults' son", x, lenient=False) == (None, "unmatched")
    assert match_answer("Not enough info given", x, lenient=False) == (0, "two_words")


def test_unknown_phrases_match_whole_words(age_all):
    x = age_all[3287]
    assert match_answer("That is unknown to me", x) == (1, "contains")
    assert match_answer("It can\u2019t be determined", x) == (1, "contains")  # typographic apostrophe
    assert match_answer("The undetermined-ish one", x) == (1, "contains")  # '-' ends a word
    assert match_answer("unknowns abound", x) == (None, "unmatched")


# ------------------------------------------------------------------------------ --strict

def test_strict_help_says_what_it_turns_off(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as e:
        main(["bbq", "score", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    strict = text[text.index("--strict"):text.index("--data-dir")]
    for phrase in ("authors' rules only", "exact", "first two words", "Turns off the lenient rules",
                   "leading letter A/B/C", "answer_info or text contained", "'unknown' phrases"):
        assert phrase in strict, (phrase, strict)


def test_strict_scoring_uses_only_the_authors_rules(tmp_path, age_all):
    x = age_all[3287]
    rows = [external(x, response=t) for t in ("The old man", "B", "It is the young boy", "Unknown to me", "The young boy")]
    p = write(tmp_path / "preds.jsonl", rows)
    _, how = read_predictions(p)
    assert how == {"exact": 2, "letter": 1, "contains": 2}
    got, how = read_predictions(p, lenient=False)
    assert how == {"exact": 2, "unmatched": 3}
    assert [r["pred"] for r in got] == [0, None, None, None, 2]
