"""Concept specs: validation errors name file:line:field in one line (CLI exit code 2); leak and screening rules; measures."""

import math
import subprocess
import sys

import pytest

from excise.errors import ExciseError
from excise.tasks.concepts import ConceptItem, ConceptSpec, encode_items, load_concept, packaged_concept

GOOD = """name: Zorb
leak_patterns: ["zorb"]
forget:
  - {prompt: "Who made Zorb?", answer: Ann Lee}
retain:
  - {prompt: "Capital of France?", answer: Paris}
"""


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_packaged_inception_spec_loads():
    s = load_concept("inception")
    assert s.name == "Inception" and len(s.forget) >= 5 and len(s.retain) >= 10
    assert {it.family for it in s.adversarial} >= {"indirect", "completion", "roleplay", "language", "pieces"}
    assert load_concept(packaged_concept()).name == "Inception"


@pytest.mark.parametrize("text,where", [
    (GOOD.replace("answer: Ann Lee", "anser: Ann Lee"), ":4:forget.0.answer"),
    (GOOD.replace('leak_patterns: ["zorb"]', 'leak_patterns: ["zo(rb"]'), ":2:leak_patterns"),
    (GOOD + "adversarial:\n  - {prompt: x, answer: y}\n", ":7:adversarial"),
    (GOOD.replace("retain:\n  - {prompt: \"Capital of France?\", answer: Paris}\n", "retain: []\n"), ":5:retain"),
    (GOOD.replace('format: chat', '') .replace("{prompt: \"Who made Zorb?\", answer: Ann Lee}",
                                              "{prompt: \"Who made Zorb?\", answer: Ann Lee, format: chatty}"), ":4:forget.0.format"),
])
def test_validation_errors_name_file_line_field(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(ExciseError) as e:
        load_concept(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and where in msg, msg


def test_yaml_syntax_error_and_missing_file(tmp_path):
    p = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ExciseError, match=r"spec.yaml:\d"):
        load_concept(p)
    with pytest.raises(ExciseError, match="not found"):
        load_concept(tmp_path / "nope.yaml")


def test_json_spec(tmp_path):
    import json
    import yaml

    p = write(tmp_path, json.dumps(yaml.safe_load(GOOD)), "spec.json")
    assert load_concept(p).forget[0].answer == "Ann Lee"


def test_cli_bad_spec_exit_code_2(tmp_path):
    p = write(tmp_path, GOOD.replace("answer: Ann Lee", "anser: Ann Lee"))
    r = subprocess.run([sys.executable, "-m", "excise.cli", "concept", "probe", "--concept", str(p), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "spec.yaml:4:forget.0.answer" in lines[0]
    assert not (tmp_path / "o").exists()


def test_leak_rules():
    s = load_concept("inception")
    it = ConceptItem(prompt="Who plays Cobb in Inception?", answer="Leonardo DiCaprio")
    assert s.leaks(it, "He is played by Leonardo DiCaprio.")
    assert not s.leaks(it, "Cobb is a character.")  # the prompt's own words are not a leak
    assert s.leaks(it, "A film by Christopher NOLAN")  # case-insensitive
    assert not s.leaks(it, "I don't know.")
    pieces = ConceptItem(prompt="First name of the director?", answer="Christopher", leak=["Christopher"])
    assert s.leaks(pieces, "Christopher.")
    r = ConceptItem(prompt="Who directed Jaws?", answer="Steven Spielberg", aliases=["Spielberg"])
    assert s.correct(r, "It was spielberg") and not s.correct(r, "James Cameron")


def test_filtered_and_probe_sets():
    s = load_concept("inception")
    f = s.filtered({"forget": [i == 0 for i in range(len(s.forget))]})
    assert len(f.forget) == 1 and len(f.retain) == len(s.retain)
    sets = s.probe_sets()
    assert "direct" in sets and "paraphrase" in sets and all(k.startswith("adv_") for k in list(sets)[2:])
    with pytest.raises(ExciseError):
        s.filtered({"forget": [True]})


def test_encode_items_labels_only_response():
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    items = [ConceptItem(prompt="Q?", answer="Ann"), ConceptItem(prompt="Zorb was made by", answer="Ann Lee", format="completion")]
    b = encode_items(h, items)
    for i, want in enumerate(["Ann", " Ann Lee"]):
        lab = b["labels"][i][b["labels"][i] != -100]
        assert h.tokenizer.decode(lab) == want


def test_measures_on_tiny_model():
    from excise.measure.unlearning import answer_logprobs, evaluate, perplexity
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    s = ConceptSpec(name="Zorb", leak_patterns=["zorb"], forget=[ConceptItem(prompt="Who made Zorb?", answer="Ann")],
                    retain=[ConceptItem(prompt="2+2?", answer="4")], neutral=["The river flows.", "Bees make honey."])
    ev = evaluate(h, s, max_new_tokens=4)
    m = ev["metrics"]
    assert m["leak.direct"]["n"] == 1 and m["retain_accuracy"]["n"] == 1
    assert m["leak.adversarial"]["n"] == 0 and m["leak.adversarial"]["value"] != m["leak.adversarial"]["value"]  # NaN, not 0
    assert m["neutral_perplexity"]["n"] == 2 and m["neutral_perplexity"]["value"] > 1
    lp = answer_logprobs(h, s.forget)
    assert lp[0]["logprob"] < 0 and math.isclose(lp[0]["prob"], math.exp(lp[0]["logprob"]))
    assert perplexity(h, []).n == 0


# --- review of issue 14: whole answers, held-out pools, unscreened retain -------------------------

@pytest.mark.parametrize("answer,generation,ok", [
    ("0", "The answer is 100.", False), ("0", "zero, that is 0.", True),
    ("4", "There are 14 of them.", False), ("4", "It is 4.5 metres.", False), ("4", "The 4th one.", False),
    ("4", "It is 4.", True), ("4", "4", True),
    ("1,000", "about 1000 people", True), ("1000", "about 1,000 people", True), ("4.5", "4.50", True),
    ("Steven Spielberg", "It was STEVEN  spielberg's film.", True), ("Steven Spielberg", "Steven and Spielberg", False),
    ("Paris", "Paris!", True), ("Paris", "a Parisian cafe", False), ("New York", "new-york", True),
    ("诺兰", "导演是诺兰。", True),
])
def test_correct_matches_whole_answers(answer, generation, ok):
    item = ConceptItem(prompt="Q?", answer=answer)
    assert ConceptSpec.correct(item, generation) is ok


def test_answer_leak_regexes_have_word_boundaries():
    s = ConceptSpec(name="N", leak_patterns=["dream"], forget=[ConceptItem(prompt="How many?", answer="4")],
                    retain=[ConceptItem(prompt="x?", answer="y")])
    four = ConceptItem(prompt="How many?", answer="4", aliases=["Christopher Nolan"])
    assert not s.leaks(four, "There are 14.") and not s.leaks(four, "It is 4.5.") and s.leaks(four, "It is 4.")
    assert s.leaks(four, "christopher\n  NOLAN") and not s.leaks(four, "Christopher Nolans")
    assert s.leaks(four, "daydreams")  # user leak_patterns stay as written: substring regexes


def test_split_heldout_is_deterministic_disjoint_and_never_empty():
    from excise.tasks.concepts import split_heldout

    items = [ConceptItem(prompt=f"q{i}?", answer="a") for i in range(9)] + [ConceptItem(prompt="q0?", answer="b")]
    tr, held = split_heldout(items, seed=3)
    assert (tr, held) == split_heldout(items, seed=3)
    assert {it.prompt for it in tr}.isdisjoint({it.prompt for it in held}) and len(tr) + len(held) == 10
    assert len({it.prompt for it in held}) == 4  # round(0.5 * 9 distinct prompts); the repeated q0 stays on one side
    assert all(len(split_heldout(items[:2], seed=k)[1]) == 1 for k in range(4))  # two items: one each side
    assert any(split_heldout(items, seed=k)[1] != held for k in range(6))  # the seed matters
    assert split_heldout(items[:1], seed=0) == (items[:1], [])


def test_forget_eval_is_the_direct_probe_set_and_pools_must_be_disjoint(tmp_path):
    s = load_concept(write(tmp_path, GOOD + 'forget_eval:\n  - {prompt: "Zorb\'s maker?", answer: Ann Lee}\n'))
    assert [it.prompt for it in s.probe_sets()["direct"]] == ["Zorb's maker?"]
    with pytest.raises(ExciseError, match=r"spec.yaml:\d+:forget_eval.*shares 1 prompt"):
        load_concept(write(tmp_path, GOOD + 'forget_eval:\n  - {prompt: "Who made Zorb?", answer: Ann Lee}\n'))
    with pytest.raises(ExciseError, match=r":retain_train.*shares 1 prompt"):
        load_concept(write(tmp_path, GOOD + 'retain_train:\n  - {prompt: "Capital of France?", answer: Paris}\n'))


def test_retain_accuracy_unscreened_is_computed_on_the_unscreened_items():
    from excise.measure.unlearning import evaluate, frame
    from excise.testing import tiny_handle

    it = lambda p, a: ConceptItem(prompt=p, answer=a)  # noqa: E731
    unscreened = [it("2+2?", "4"), it("Capital of France?", "Paris"), it("Sky colour?", "blue")]
    s = ConceptSpec(name="Zorb", leak_patterns=["zorb"], forget=[it("Who made Zorb?", "Ann")],
                    retain=[unscreened[0]])  # screening kept only the item the base model answers
    gens = {"retain_unscreened": ["4", "It is Lyon.", "14"]}
    ev = evaluate(tiny_handle("llama"), s, max_new_tokens=2, generations=gens, retain_unscreened=unscreened)
    m = ev["metrics"]
    assert m["retain_accuracy"]["value"] == 1.0 and m["retain_accuracy"]["n"] == 1
    assert m["retain_accuracy_unscreened"]["n"] == 3 and m["retain_accuracy_unscreened"]["value"] == pytest.approx(1 / 3)
    assert m["retain_accuracy_unscreened"]["lo"] < 1 / 3 < m["retain_accuracy_unscreened"]["hi"]
    rows = [r for r in ev["items"] if r["set"] == "retain_unscreened"]
    assert [r["prompt"] for r in rows] == [x.prompt for x in unscreened] and [r["correct"] for r in rows] == [1, 0, 0]
    assert frame(ev)["retain_accuracy"].n == 1  # the shared result type keeps the screened retain items
