"""Unlearning loops on a tiny model, localizers, relearning guard, task data and bad input."""

import json
import math

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.unlearn_methods import METHODS, UnlearnConfig, cycle, unlearn
from excise.tasks.arithmetic import (FORGET_OPS, OPS, RETAIN_OPS, eval_items, facts, is_eval_string, load_items,
                                     train_items, train_stream)
from excise.organisms.arithmetic import WordDigitTokenizer
from excise.testing import tiny_handle


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("method", METHODS)
def test_each_unlearning_method_runs_and_moves_the_model(method):
    h = tiny_handle("llama", seed=0)
    before = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    cfg = UnlearnConfig(method=method, steps=2, batch_size=4, lr=1e-2, rmu_layer=1, rmu_n_layers_updated=1)
    log = unlearn(h.model, h.tokenizer, train_stream(FORGET_OPS, 0), train_stream(RETAIN_OPS, 1), cfg)
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    changed = {n for n, p in h.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    if method == "rmu":  # only the MLP of the steered layer moves
        assert all(n.startswith("model.layers.1.mlp.") for n in changed)
    if method == "grad_ascent":  # ascent: the forget NLL goes up from step 1 to 2 on average is not guaranteed,
        assert log[0]["loss"] < 0  # but its objective is the negative NLL


def test_unlearning_needs_retain_data_and_valid_layer():
    h = tiny_handle("llama", seed=0)
    with pytest.raises(ExciseError, match="retain"):
        unlearn(h.model, h.tokenizer, train_stream(FORGET_OPS, 0), None, UnlearnConfig(method="maxent", steps=1))
    with pytest.raises(ExciseError, match="rmu_layer"):
        unlearn(h.model, h.tokenizer, train_stream(FORGET_OPS, 0), train_stream(RETAIN_OPS, 0),
                UnlearnConfig(method="rmu", steps=1, rmu_layer=5))


def test_fisher_is_the_mean_of_per_example_squared_gradients_on_answer_tokens():
    """Brute force: one autograd.grad per example of its answer NLL; square; average over examples."""
    from excise.lm import lm_batch
    from excise.locate.fisher import fisher_scores
    from excise.losses import sequence_logprob

    h = tiny_handle("llama", seed=0)
    items, retain = train_items(FORGET_OPS, 5, 0), train_items(RETAIN_OPS, 3, 0)
    params = dict(h.model.named_parameters())

    def brute(its):
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        for it in its:
            b = lm_batch(h.tokenizer, [it.text], prompts=[it.prompt])
            lp = sequence_logprob(h.model(input_ids=b["input_ids"]).logits, b["labels"]).sum()
            for (n, _), g in zip(params.items(), torch.autograd.grad(-lp, list(params.values()), allow_unused=True)):
                if g is not None:
                    acc[n] += g.pow(2)
        return {n: v / len(its) for n, v in acc.items()}

    want = brute(items)
    sc = fisher_scores(h.model, h.tokenizer, items, batch_size=2)  # chunks of 2 (and a last chunk of 1)
    assert sc.meta["per_example"] and sc.meta["loss_on"] == "answer"
    for n in params:
        torch.testing.assert_close(sc.values[n], want[n], rtol=1e-4, atol=1e-9)
    # not the square of the batch-mean gradient (what the old localizer computed)
    b = lm_batch(h.tokenizer, [it.text for it in items], prompts=[it.prompt for it in items])
    g = torch.autograd.grad(-sequence_logprob(h.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                              b["labels"]).mean(), params["model.layers.0.mlp.down_proj.weight"])[0]
    assert not torch.allclose(g.pow(2), want["model.layers.0.mlp.down_proj.weight"], rtol=1e-2)
    # retain contrast: max(F_forget - lambda F_retain, 0)
    ret = brute(retain)
    sc2 = fisher_scores(h.model, h.tokenizer, items, retain_items=retain, retain_weight=0.5)
    for n in params:
        torch.testing.assert_close(sc2.values[n], (want[n] - 0.5 * ret[n]).clamp(min=0), rtol=1e-4, atol=1e-9)
    with pytest.raises(ExciseError, match="retain"):
        fisher_scores(h.model, h.tokenizer, items, retain_weight=1.0)


def test_snmf_scores_shape():
    from excise.locate.snmf import SNMFConfig, snmf_scores

    h = tiny_handle("llama", seed=0)
    sc = snmf_scores(h, h.tokenizer, train_items(FORGET_OPS, 8, 0), train_items(RETAIN_OPS, 8, 0),
                     SNMFConfig(k=4, iters=5, n_forget_features=2))
    assert sc.kind == "neuron" and sc.values.shape == (2, 128) and (sc.values >= 0).all()


def test_forget_only_relearning_data_contains_only_forget_operations():
    from excise.attack.relearn_arithmetic import attack_items

    items = attack_items("forget", 500, seed=0)
    assert len(items) == 500 and {it.op for it in items} == set(FORGET_OPS)
    mixed = attack_items("mixed", 500, seed=0)
    assert {it.op for it in mixed} == set(OPS)
    # the reference code's pitfall: a retain set passed as forget-only attack data is refused
    with pytest.raises(ExciseError, match="retain"):
        attack_items("forget", 10, 0, items=train_items(RETAIN_OPS, 10, 0))
    with pytest.raises(ExciseError):
        attack_items("everything", 10, 0)


def test_relearn_curve_summary_and_attack_leaves_model_untouched():
    from excise.attack.relearn_arithmetic import RelearnConfig, curve_summary, relearn

    s = curve_summary([{"step": 0, "forget": 0.0}, {"step": 10, "forget": 0.6}, {"step": 20, "forget": 1.0}])
    assert s["auc"] == pytest.approx((0.3 * 10 + 0.8 * 10) / 20) and s["steps_to_50"] == 10
    s = curve_summary([{"step": 0, "forget": 0.0}, {"step": 10, "forget": 0.1}])
    assert math.isnan(s["steps_to_50"]) and not s["reached_50"]
    h = tiny_handle("llama", seed=0)
    before = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    res = relearn(h.model, h.tokenizer, RelearnConfig(lrs=[1e-3], steps=2, eval_every=1, batch_size=2, n_items=8),
                  eval_items=eval_items(OPS, 2))
    assert res["attack_ops"] == sorted(FORGET_OPS) and len(res["per_lr"][0]["curve"]) == 3
    assert all(torch.equal(p, before[n]) for n, p in h.model.named_parameters())


def test_task_split_is_disjoint_by_string_and_facts_recur():
    ev = eval_items(OPS, 100, seed=0)
    tr = train_items(OPS, 4000, seed=0)
    ev_prompts = {it.prompt for it in ev}
    assert len(ev_prompts) == 400
    assert not ev_prompts & {it.prompt for it in tr}
    assert all(is_eval_string(p) for p in ev_prompts)
    ev_facts = {(it.op, it.answer) for it in ev}
    assert len(ev_facts & {(it.op, it.answer) for it in tr}) > 0.9 * len(ev_facts)
    assert train_items(OPS, 50, seed=3) == train_items(OPS, 50, seed=3)
    assert len(facts("mul")) == 400 and len(facts("div")) == 400 and len(facts("add")) == 2500
    assert all(a % b == 0 and a // b == c and 1 <= b <= 20 and 1 <= c <= 20 for a, b, c in facts("div"))
    assert all(c >= 0 for _, _, c in facts("sub"))
    for it in train_items(OPS, 200, seed=1):
        a, b = [int(x) for x in __import__("re").findall(r"\d+", it.prompt)[:2]]
        assert {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}[it.op] == it.answer


def test_tokenizer_roundtrip_and_first_number():
    from excise.measure.arithmetic import first_number

    tok = WordDigitTokenizer()
    ids = tok.encode("what is 12 times 7? 84.")
    assert tok.decode(ids) == "what is 12 times 7 ? 84 ."
    assert first_number(tok.decode(tok.encode("84."))) == 84
    assert first_number(" -3 apples") == -3 and first_number("apples 3") is None
    batch = tok(["1 + 1 = ", "what is 3 plus 4? "], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_load_items_bad_input(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps({"prompt": "3 * 4 = ", "answer": 12, "op": "mul"}) + "\n" + "{not json\n")
    with pytest.raises(ExciseError, match=r"f.jsonl:2"):
        load_items(p)
    p.write_text(json.dumps({"prompt": "3 * 4 = ", "answer": "x"}) + "\n")
    with pytest.raises(ExciseError, match=r"f.jsonl:1:answer"):
        load_items(p)
    p.write_text(json.dumps({"prompt": "", "answer": 1}) + "\n")
    with pytest.raises(ExciseError, match=r"f.jsonl:1:prompt"):
        load_items(p)
    p.write_text(json.dumps({"prompt": "1 + 1 = ", "answer": 2, "op": "add", "colour": 1}) + "\n")
    with pytest.raises(ExciseError, match=r"f.jsonl:1:colour"):
        load_items(p)
    p.write_text(json.dumps({"prompt": "1 + 1 = ", "answer": 2, "op": "add"}) + "\n")
    with pytest.raises(ExciseError, match=r"f.jsonl:1:op"):
        load_items(p, required_ops=FORGET_OPS)
    with pytest.raises(ExciseError, match="not found"):
        load_items(tmp_path / "missing.jsonl")


def test_config_bad_input():
    from excise.config import validate
    from excise.recipes.robust_config import RobustUnlearnConfig

    with pytest.raises(ExciseError, match="recipe.yaml:alphas"):
        validate(RobustUnlearnConfig, {"alphas": "lots"}, "recipe.yaml")
    with pytest.raises(ExciseError, match="unknown setting"):
        validate(RobustUnlearnConfig, {"nosuch": 1}, "recipe.yaml")
    with pytest.raises(ExciseError, match="methods.x.method"):
        validate(RobustUnlearnConfig, {"methods": {"x": {"method": "forgetful"}}}, "recipe.yaml")
    with pytest.raises(ExciseError, match="cycle|empty"):
        next(cycle([], 0))
