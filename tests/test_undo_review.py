"""Issue 15's review defects: disjoint item pools, RMU's answer positions and scale, the cosine
distillation schedule and its curves, the relearning attack's strength, and the forget-file guard."""

import json
import math

import pytest
import torch

from excise.errors import ExciseError
from excise.tasks.arithmetic import (FORGET_OPS, OPS, POOLS, RETAIN_OPS, eval_items, load_items, pool_of, split_pools,
                                     train_items, train_stream)
from excise.testing import tiny_handle, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 1. development, early-stop and test pools ----------------------------------------------

def test_pools_are_disjoint_by_construction_and_from_training_streams():
    texts = {p: {it.text for s in (0, 1, 2000) for it in eval_items(OPS, 60, seed=s, pool=p)} for p in POOLS}
    train = {it.text for s in (0, 1, 40_000) for it in train_items(OPS, 3000, seed=s)}
    assert all(texts.values())
    names = list(POOLS)
    for i, a in enumerate(names):
        assert not texts[a] & train, a
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    # every prompt is in the pool it was drawn from; the sweep's old dev items (seed 0, 50 per op)
    # were the test set's own: now the dev pool cannot meet the test pool whatever the seeds
    for p in POOLS:
        assert all(pool_of(it.prompt) == p for it in eval_items(OPS, 20, seed=3, pool=p))
    assert not {it.prompt for it in eval_items(OPS, 50, pool="dev")} & {it.prompt for it in eval_items(OPS, 100, seed=0)}
    with pytest.raises(ExciseError, match="pool"):
        eval_items(OPS, 2, pool="holdout")
    with pytest.raises(ExciseError, match="train"):
        eval_items(OPS, 2, pool="train")


def test_user_files_are_split_into_disjoint_pools():
    items = train_items(OPS, 40, seed=0)  # a small file: position split
    pools = split_pools(items)
    ids = {p: {id(it) for it in v} for p, v in pools.items()}
    assert all(ids.values()) and sum(len(v) for v in pools.values()) == 40
    assert len(set().union(*ids.values())) == 40
    big = [it for p in POOLS for it in eval_items(OPS, 20, pool=p)] + train_items(OPS, 500, seed=0)
    pools = split_pools(big)  # large: by the prompt's hash, the same pools as the generator's
    assert all(pool_of(it.prompt) == p for p, v in pools.items() for it in v)


def test_recipe_data_uses_the_check_pool_for_early_stop_and_the_test_pool_for_results(tmp_path):
    from excise.recipes.robust_config import RobustUnlearnConfig
    from excise.recipes.robust_unlearn import Data

    data = Data(RobustUnlearnConfig())
    assert {pool_of(it.prompt) for it in data.eval(20, seed=1, pool="check")} == {"check"}
    assert {pool_of(it.prompt) for it in data.eval(20)} == {"test"}
    f, r = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(it.as_dict()) + "\n" for it in train_items(FORGET_OPS, 30, 0)))
    r.write_text("".join(json.dumps(it.as_dict()) + "\n" for it in train_items(RETAIN_OPS, 30, 0)))
    data = Data(RobustUnlearnConfig(forget_file=str(f), retain_file=str(r)))
    test, check = {it.text for it in data.eval(0)}, {it.text for it in data.eval(0, pool="check")}
    train = {it.text for it in data.f_train + data.r_train}
    assert test and check and not test & check and not (test | check) & train


# --- 6. the forget-only guard checks the rows as given ---------------------------------------

def test_forget_file_holding_retain_rows_fails_with_file_and_line(tmp_path, capsys):
    from excise.cli import main
    from excise.recipes.robust_config import RobustUnlearnConfig
    from excise.recipes.robust_unlearn import Data

    f, r = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    rows = [it.as_dict() for it in train_items(FORGET_OPS, 2, 0)] + [train_items(RETAIN_OPS, 1, 0)[0].as_dict()]
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r.write_text("".join(json.dumps(it.as_dict()) + "\n" for it in train_items(RETAIN_OPS, 5, 0)))
    with pytest.raises(ExciseError, match=r"forget.jsonl:3:op") as e:
        Data(RobustUnlearnConfig(forget_file=str(f), retain_file=str(r)))
    assert "retain operation" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ExciseError, match=r"retain.jsonl:1:op"):  # and the other way round
        Data(RobustUnlearnConfig(forget_file=str(r), retain_file=str(r)))
    custom = tmp_path / "custom.jsonl"  # ops the task does not know are the file's group
    custom.write_text(json.dumps({"prompt": "who directed inception? ", "answer": 1}) + "\n")
    assert load_items(custom, group="forget")[0].op == "custom"
    with pytest.raises(SystemExit) as ex:
        main(["undo", "relearn", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--forget-file", str(f)])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "forget.jsonl:3:op" in err and len(err.strip().splitlines()) == 1


# --- 3. RMU: answer positions, scale from the measured norm ----------------------------------

def test_rmu_steers_answer_positions_and_scales_c_by_the_measured_norm():
    from excise.intervene.unlearn_methods import UnlearnConfig, pair_batches, rmu_positions, unlearn
    from excise.trace import Trace

    h = tiny_handle("llama", seed=0)
    b = next(pair_batches(h.tokenizer, train_stream(FORGET_OPS, 0), None, 4, "answer"))
    pos = rmu_positions(b, "answer")
    for i in range(4):
        ans = (b["labels"][i] != -100).nonzero().flatten()
        assert pos[i].nonzero().flatten().tolist() == (ans - 1).tolist()  # each position predicts an answer token
    assert torch.equal(rmu_positions(b, "all"), b["attention_mask"])
    with torch.no_grad(), Trace(h.model, ["resid.1"]) as tr:
        h.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        norm = float(tr.cache["resid.1"].norm(dim=-1)[pos.bool()].mean())
    info: dict = {}
    cfg = UnlearnConfig(method="rmu", steps=1, batch_size=4, rmu_layer=1, rmu_n_layers_updated=1, loss_on="answer",
                        rmu_c_factor=3.0)
    unlearn(h.model, h.tokenizer, train_stream(FORGET_OPS, 0), train_stream(RETAIN_OPS, 1), cfg, info=info)
    assert info["rmu_resid_norm"] == pytest.approx(norm, rel=1e-5) and info["rmu_c"] == pytest.approx(3.0 * norm, rel=1e-5)
    info = {}
    unlearn(tiny_handle("llama").model, h.tokenizer, train_stream(FORGET_OPS, 0), train_stream(RETAIN_OPS, 1),
            cfg.model_copy(update={"rmu_c": 6.5}), info=info)
    assert info["rmu_c"] == 6.5 and info["rmu_c_rule"] == "given"


# --- 4. distillation: cosine 7e-4 -> 7e-5, curves ---------------------------------------------

def test_cosine_schedule_ends_at_min_lr():
    from excise.train import TrainConfig, train

    m = tiny_model("llama", seed=0)
    x = torch.randint(3, 200, (4, 6))
    cfg = TrainConfig(steps=11, lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=1, batch_size=4)
    lrs = [r["lr"] for r in train(m, lambda s: {"input_ids": x}, lambda mm, b: mm(input_ids=b["input_ids"]).logits.pow(2).mean(),
                                  cfg).log]
    want = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 1) / 10)) for s in range(1, 11)]
    assert lrs[0] == 0.0 and lrs[1:] == pytest.approx(want[:10], rel=1e-6)
    assert min(lrs[1:]) >= 1e-4 - 1e-12
    with pytest.raises(ExciseError, match="cosine"):
        train(m, lambda s: {"input_ids": x}, lambda mm, b: mm(input_ids=b["input_ids"]).logits.mean(),
              TrainConfig(steps=1, min_lr=1e-5))


def test_distill_defaults_and_curve_records_loss_retain_and_forget():
    import copy

    from excise.intervene.undo import DistillConfig, NoiseConfig, apply_noise, distill
    from excise.testing import ByteTokenizer

    d = DistillConfig()
    assert (d.lr, d.min_lr, d.schedule, d.batch_size) == (7e-4, 7e-5, "cosine", 128)
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    apply_noise(student, NoiseConfig(alpha=0.5, seed=0))
    res = distill(student, teacher, ByteTokenizer(), train_stream(OPS, 0), DistillConfig(max_steps=4, eval_every=2, batch_size=2),
                  retain_check=lambda m: 0.1, teacher_retain=0.9, forget_check=lambda m: 0.2)
    assert [p["step"] for p in res["curve"]] == [0, 2, 4]
    assert res["curve"][0]["loss"] is None and all(p["loss"] > 0 for p in res["curve"][1:])
    assert all(p["retain"] == 0.1 and p["forget"] == 0.2 for p in res["curve"])


# --- 5. the relearning attack ---------------------------------------------------------------

def test_relearning_attack_defaults_are_strong_and_quick_stays_small():
    from excise.attack.relearn_arithmetic import RelearnConfig, relearn
    from excise.recipes.robust_config import RobustUnlearnConfig, quick_variant

    rc = RelearnConfig()
    ratios = [b / a for a, b in zip(rc.lrs, rc.lrs[1:])]
    assert 6 <= len(rc.lrs) <= 10 and rc.lrs[0] == 1e-4 and rc.lrs[-1] == 1e-2
    assert max(ratios) / min(ratios) < 1.02 and rc.steps >= 200 and rc.data == "forget"
    q = quick_variant(RobustUnlearnConfig()).relearn
    assert len(q.lrs) == 2 and q.steps <= 60
    h = tiny_handle("llama", seed=0)
    res = relearn(h.model, h.tokenizer, RelearnConfig(lrs=[1e-3, 1e-2], steps=2, eval_every=1, batch_size=2, n_items=8),
                  eval_items=eval_items(FORGET_OPS, 2))
    assert set(res["per_lr"][0]["curve"][0]) == {"step", "forget"}  # held-out forget items only
    assert res["auc"] == max(r["auc"] for r in res["per_lr"])
