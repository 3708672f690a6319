"""Fair fine-tuning of encoders (issue 11): every term alone on every encoder family, GRL sign, soft
parity gaps by hand, base weights unchanged, early stopping, checkpoint selection, exact export."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.fair_export import export, load_epoch, load_exported
from excise.intervene.fair_finetune import (
    QV_TARGETS,
    FairFinetuneConfig,
    build_fair_encoder,
    changed_base_weights,
    embed,
    fair_finetune,
    pool,
    predict,
)
from excise.intervene.fair_losses import GradReverse, dp_gap, eo_gap, grad_reverse, ovr_gaps
from excise.intervene.fair_select import best_fairness, best_util, select_window
from excise.testing import ENCODERS, save_tiny, tiny_handle


@dataclass(frozen=True)
class Ex:
    text: str
    label: str
    groups: dict = field(default_factory=dict)
    text_pair: str | None = None


def _examples(n: int = 24, pairs: bool = False) -> list[Ex]:
    out = []
    for i in range(n):
        label = ("nurse", "pilot", "chef")[i % 3]
        gender = "f" if (i % 3 == 0) == (i % 4 != 0) else "m"  # skewed: most nurses f, most others m
        text = f"{'she' if gender == 'f' else 'he'} works as a [MASK] {i}"
        out.append(Ex(text, label, {"gender": gender}, f"job {label} offer {i % 5}" if pairs else None))
    return out


TRAIN, VAL = _examples(24), _examples(12)
SMALL = dict(epochs=1, batch_size=8, max_length=32, lr=1e-3)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def handles():
    return {fam: tiny_handle(fam) for fam in ENCODERS}


# --- training runs for every family and every term ----------------------------------------------

TERMS = {"plain": {}, "adv": {"lambda_adv": 1.0}, "attr": {"lambda_attr": 0.5}, "dp": {"lambda_dp": 1.0},
         "eo": {"lambda_eo": 1.0}}


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("fam", ENCODERS)
def test_one_epoch_each_term_alone(handles, fam, term, tmp_path):
    h = handles[fam]
    cfg = FairFinetuneConfig(**SMALL, **TERMS[term])
    res = fair_finetune(h, TRAIN, VAL, cfg, directory=tmp_path)
    assert len(res.history) == 1 and res.steps_per_epoch == 3
    row = res.history[0]
    for k in ("train_task", "train_total", "train_dp", "train_eo", "val_loss", "val_macro_f1", "val_eo_gap"):
        assert math.isfinite(row[k]), (k, row)
    assert ("train_adv" in row) == (term == "adv") and ("train_attr" in row) == (term == "attr")
    if term in ("plain", "dp", "eo"):
        assert res.model.adversary is None and res.model.attr_head is None
    lam = {"dp": cfg.lambda_dp, "eo": cfg.lambda_eo}.get(term, 0.0)
    if term in ("plain", "dp", "eo"):  # total = task + lambda * soft gap
        extra = lam * row[f"train_{term}"] if lam else 0.0
        assert row["train_total"] == pytest.approx(row["train_task"] + extra, rel=1e-5)
    assert changed_base_weights(res.model, h.model) == []
    logits, emb = predict(res.model, VAL)
    assert logits.shape == (len(VAL), 3) and emb.shape == (len(VAL), h.anatomy.d_model)


@pytest.mark.parametrize("fam", ENCODERS)
def test_default_lora_targets_are_query_value(handles, fam):
    fe = build_fair_encoder(handles[fam], TRAIN, FairFinetuneConfig(**SMALL))
    names = {n.split(".")[-1] for n, m in fe.encoder.named_modules() if hasattr(m, "lora_A")}
    assert names == set(QV_TARGETS[fam])
    assert not any(hasattr(m, "lora_A") for m in handles[fam].model.modules())  # the caller's model is untouched


def test_text_pairs_go_through_the_tokenizer_as_pairs(handles):
    h = handles["bert"]
    fe = build_fair_encoder(h, _examples(6, pairs=True), FairFinetuneConfig(**SMALL))
    single = fe.collate(_examples(2), targets=False)["input_ids"]
    paired = fe.collate(_examples(2, pairs=True), targets=False)["input_ids"]
    assert paired.shape[1] > single.shape[1] and bool((paired == h.tokenizer.eos_token_id).any())
    with pytest.raises(ExciseError, match="mixes single texts and text pairs"):
        fe.collate([_examples(1)[0], _examples(1, pairs=True)[0]])
    res = fair_finetune(h, _examples(16, pairs=True), _examples(6, pairs=True), FairFinetuneConfig(**SMALL))
    assert math.isfinite(res.history[0]["val_loss"])


def test_attribute_must_be_named_when_several(handles):
    ex = [Ex("a", "x", {"gender": "f", "race": "b"}), Ex("b", "y", {"gender": "m", "race": "w"})]
    with pytest.raises(ExciseError, match="set attribute"):
        build_fair_encoder(handles["bert"], ex, FairFinetuneConfig(**SMALL))
    fe = build_fair_encoder(handles["bert"], ex, FairFinetuneConfig(**SMALL, attribute="race"))
    assert fe.group_values == ["b", "w"]


def test_classes_fix_the_head_order_with_int_labels(handles):
    """Labels as indices into label_names (as excise.tasks.fairness gives them); class 3 absent from training."""
    ex = [Ex(e.text, ("nurse", "pilot", "chef").index(e.label), e.groups) for e in TRAIN]
    res = fair_finetune(handles["roberta"], ex, ex[:9], FairFinetuneConfig(**SMALL), classes=range(4))
    assert res.model.classes == [0, 1, 2, 3]
    assert predict(res.model, ex[:5])[0].shape == (5, 4)
    assert math.isfinite(res.history[0]["val_macro_f1"])


# --- the terms by hand --------------------------------------------------------------------------

def test_grl_reverses_and_scales_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = grad_reverse(z, 0.5)
    assert torch.equal(y, z)
    (y * w).sum().backward()
    torch.testing.assert_close(z.grad, -0.5 * w)
    z.grad = None
    (GradReverse(2.0)(z) * w).sum().backward()
    torch.testing.assert_close(z.grad, -2.0 * w)


def test_adversary_descends_while_encoder_ascends(handles):
    """Through the GRL the adversary's weights get the gradient of its loss; the embedding gets its negative."""
    fe = build_fair_encoder(handles["bert"], TRAIN, FairFinetuneConfig(**SMALL, lambda_adv=1.0))
    batch = fe.collate(TRAIN[:8])
    z = fe.embed_batch(batch).detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(fe.adversary(fe.grl(z)), batch["groups"])
    gz, gw = torch.autograd.grad(loss, [z, fe.adversary[0].weight])
    z2 = z.detach().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(fe.adversary(z2), batch["groups"])
    gz2, gw2 = torch.autograd.grad(plain, [z2, fe.adversary[0].weight])
    torch.testing.assert_close(gz, -gz2)
    torch.testing.assert_close(gw, gw2)


def test_dp_eo_zero_for_identical_groups_positive_otherwise():
    p = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.8, 0.2], [0.6, 0.4]])
    y = torch.tensor([0, 1, 0, 1])
    g = torch.tensor([0, 0, 1, 1])
    for red in ("max_pairwise", "mean_sq"):
        assert float(dp_gap(p, g, red)) == 0.0
        assert float(eo_gap(p, y, g, red)) == 0.0
    # group 0 means [0.7, 0.3], group 1 [0.3, 0.7]: gap 0.4 per class; mean_sq: (0.2)^2 = 0.04
    q = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6]], requires_grad=True)
    assert float(dp_gap(q, g).detach()) == pytest.approx(0.4)
    assert float(dp_gap(q, g, "mean_sq").detach()) == pytest.approx(0.04)
    # EO: class 0, y=0 rows {0 (g0), 2 (g1)}: |0.8 - 0.2| = 0.6; y!=0 rows {1, 3}: |0.6 - 0.4| = 0.2;
    # class 1 mirrors it: mean (0.6 + 0.2 + 0.6 + 0.2) / 4 = 0.4
    eo = eo_gap(q, y, g)
    assert float(eo.detach()) == pytest.approx(0.4)
    eo.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # three groups: max pairwise is max - min of the group means
    p3 = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    assert float(dp_gap(p3, torch.tensor([0, 1, 2]))) == pytest.approx(0.7)
    # one group in the batch: no signal, 0 (not NaN)
    assert float(dp_gap(q, torch.zeros(4, dtype=torch.long)).detach()) == 0.0
    assert float(eo_gap(q, y, torch.zeros(4, dtype=torch.long)).detach()) == 0.0


def test_ovr_gaps_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    g = np.array(["f", "f", "m", "m", "f", "f", "m", "m"])
    # class 0: TPR f 1.0, m 0.5 (gap .5); FPR f 0.0, m 0.5 (gap .5). class 1 mirrors: EO .5, TPR .5
    out = ovr_gaps(y, pred, g)
    assert out["tpr_gap"] == pytest.approx(0.5) and out["eo_gap"] == pytest.approx(0.5)
    assert out["dp_gap"] == pytest.approx(0.0)  # f predicts 0 for 2/4, m for 2/4
    assert math.isnan(ovr_gaps(y, pred, np.array(["f"] * 8))["tpr_gap"])  # one group: undefined, never 0


# --- base frozen, determinism, early stopping -----------------------------------------------------

def test_base_weights_unchanged_adapter_and_heads_trained(handles):
    h = handles["bert"]
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    fe0 = build_fair_encoder(h, TRAIN, FairFinetuneConfig(**SMALL, lambda_adv=1.0))
    init = fe0.trainable_state()
    res = fair_finetune(h, TRAIN, None, FairFinetuneConfig(**SMALL, lambda_adv=1.0))
    assert changed_base_weights(res.model, h.model) == []
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())  # caller's handle untouched
    after = res.model.trainable_state()
    assert set(after) == set(init)
    assert any("lora_B" in k and not torch.equal(init[k], after[k]) for k in after)
    assert not torch.equal(init["head.weight"], after["head.weight"])
    assert not torch.equal(init["adversary.0.weight"], after["adversary.0.weight"])


def test_same_seed_same_weights(handles):
    h = handles["electra"]
    a = fair_finetune(h, TRAIN, None, FairFinetuneConfig(**SMALL, lambda_eo=1.0, seed=3)).model.trainable_state()
    b = fair_finetune(h, TRAIN, None, FairFinetuneConfig(**SMALL, lambda_eo=1.0, seed=3)).model.trainable_state()
    c = fair_finetune(h, TRAIN, None, FairFinetuneConfig(**SMALL, lambda_eo=1.0, seed=4)).model.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_on_a_flat_criterion(handles, tmp_path):
    """With a learning rate too small to change predictions, macro-F1 never improves: patience 1 stops at epoch 2."""
    cfg = FairFinetuneConfig(**{**SMALL, "epochs": 5, "lr": 1e-12}, patience=1)
    res = fair_finetune(handles["bert"], TRAIN, VAL, cfg, directory=tmp_path)
    assert res.stopped_early and len(res.history) == 2 and "patience 1" in res.stop_reason
    hist = json.loads((tmp_path / "training_history.json").read_text())
    assert hist["stopped_early"] and len(hist["epochs"]) == 2
    no_stop = fair_finetune(handles["bert"], TRAIN, VAL, cfg.model_copy(update={"patience": 0, "epochs": 3}))
    assert not no_stop.stopped_early and len(no_stop.history) == 3


def test_history_files_and_epoch_checkpoints(handles, tmp_path):
    h = handles["modernbert"]
    cfg = FairFinetuneConfig(**{**SMALL, "epochs": 3, "lr": 5e-3}, lambda_dp=1.0)
    res = fair_finetune(h, TRAIN, VAL, cfg, directory=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "epoch_metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"val_macro_f1", "val_eo_gap", "val_tpr_gap", "train_dp", "checkpoint"} <= set(rows[0])
    hist = json.loads((tmp_path / "training_history.json").read_text())
    assert hist["best_util"]["epoch"] in (1, 2, 3) and hist["classes"] == ["chef", "nurse", "pilot"]
    last = predict(res.model, VAL)[0]
    load_epoch(res.model, tmp_path, 1)
    first = predict(res.model, VAL)[0]
    assert not np.allclose(first, last)
    load_epoch(res.model, tmp_path, 3)
    np.testing.assert_array_equal(predict(res.model, VAL)[0], last)
    with pytest.raises(ExciseError, match="no checkpoint for epoch 9"):
        load_epoch(res.model, tmp_path, 9)


# --- selection ------------------------------------------------------------------------------------

HIST = [
    {"epoch": 1, "val_macro_f1": 0.50, "val_eo_gap": 0.10},
    {"epoch": 2, "val_macro_f1": 0.60, "val_eo_gap": 0.20},
    {"epoch": 3, "val_macro_f1": 0.58, "val_eo_gap": 0.07},
    {"epoch": 4, "val_macro_f1": 0.62, "val_eo_gap": 0.15},
    {"epoch": 5, "val_macro_f1": 0.55, "val_eo_gap": 0.05},
    {"epoch": 6, "val_macro_f1": 0.70, "val_eo_gap": None},
]


def test_best_util_and_best_fairness():
    assert best_util(HIST).epoch == 6
    assert best_fairness(HIST).epoch == 5  # epoch 6's gap is undefined: never the fairest
    assert best_util([{"epoch": 1, "val_macro_f1": None}]).epoch is None


def test_window_selection_picks_the_most_useful_fair_epoch():
    s = select_window(HIST, start=2, end=5, threshold=0.10)
    assert s.epoch == 3 and s and "0.58" in s.reason  # epochs 3 and 5 qualify; 3 is more useful
    assert select_window(HIST, start=1, end=6, threshold=0.16).epoch == 4  # 6 is undefined, 2 over the threshold
    assert select_window(HIST, start=1, end=1, threshold=0.10).epoch == 1  # at most the threshold qualifies


def test_window_selection_says_when_none_qualifies():
    s = select_window(HIST, start=2, end=4, threshold=0.05)
    assert s.epoch is None and not s
    assert "no checkpoint in epochs 2..4" in s.reason and "smallest is 0.0700 at epoch 3" in s.reason
    assert "epochs trained: 1..6" in select_window(HIST, start=8, end=9, threshold=1).reason
    assert "empty window" in select_window(HIST, start=3, end=2, threshold=1).reason
    assert "defined" in select_window(HIST, start=6, end=6, threshold=1).reason


# --- embeddings and export --------------------------------------------------------------------------

def test_embed_mean_pooled_normalised_and_padding_free(handles):
    h = handles["deberta-v2"]
    texts = ["a short one", "a much longer sentence than the first one"]
    e = embed(h, texts)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    alone = np.concatenate([embed(h, [t]) for t in texts])
    np.testing.assert_allclose(e, alone, atol=1e-5)
    enc = h.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hid = h.model(**enc).last_hidden_state
    manual = torch.nn.functional.normalize(pool(hid, enc["attention_mask"], "mean"), dim=-1).numpy()
    np.testing.assert_allclose(e, manual, atol=1e-6)
    cls = pool(hid, enc["attention_mask"], "cls")
    torch.testing.assert_close(cls, hid[:, 0])


def test_export_round_trip_exact(tmp_path):
    """PeftModel.from_pretrained(AutoModel.from_pretrained(base), dir) reproduces the fine-tuned embeddings."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from excise.models import load

    base = save_tiny("bert", tmp_path / "base")
    h = load(str(base))
    train_ex, val_ex = _examples(16, pairs=True), _examples(6, pairs=True)
    res = fair_finetune(h, train_ex, val_ex, FairFinetuneConfig(**{**SMALL, "lr": 5e-3}, lambda_adv=1.0),
                        directory=tmp_path / "run")
    card = {"data": {"train": len(train_ex), "source": "synthetic"}, "metrics": res.history[-1],
            "limits": ["tiny random model: numbers mean nothing"]}
    out = export(res.model, tmp_path / "export", base_name=str(base), card=card)
    for f in ("adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "fair_encoder.json", "README.md"):
        assert (out / f).exists(), f
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    readme = (out / "README.md").read_text()
    assert all(s in readme for s in ("## Data", "## Metrics", "## Limits", "tiny random model", "base_model:"))
    logits, emb = predict(res.model, val_ex)

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    enc = tok([e.text for e in val_ex], text_pair=[e.text_pair for e in val_ex], padding=True, truncation=True,
              max_length=32, return_tensors="pt")
    with torch.no_grad():
        hid = model(**enc).last_hidden_state
    plain = pool(hid, enc["attention_mask"], "mean").numpy()
    np.testing.assert_array_equal(plain, emb)

    fe = load_exported(out)
    logits2, emb2 = predict(fe, val_ex)
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(logits2, logits)
    assert fe.classes == res.model.classes and fe.adversary is not None
    with pytest.raises(ExciseError, match="needs 'metrics'"):
        export(res.model, tmp_path / "bad", base_name=str(base), card={"data": "x"})
    assert not (tmp_path / "bad").exists()
