"""The one training loop (excise.train) and the one way to make a model trainable, on tiny models."""

import itertools
import math

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.trainable import LoraFields, make_trainable
from excise.select import Mask
from excise.testing import DECODERS, tiny_model
from excise.train import Examples, TrainConfig, latest_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _seqs(n=16, length=6, seed=0):
    """Equal-length sequences, so a token mean is an example mean (accumulation and splits are exact)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (length,), generator=g) for _ in range(n)]


def _collate(chunk):
    ids = torch.stack(chunk)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _lm_loss(model, batch):
    return model(**batch).loss


def _examples(batch_size=4, seed=0):
    return Examples(_seqs(), batch_size, collate=_collate, seed=seed)


def _stream(batch_size=4):
    seqs = _seqs()
    for s in itertools.count():
        i = (s * batch_size) % len(seqs)
        yield _collate(seqs[i:i + batch_size])


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source", ["examples", "iterator"])
def test_resume_after_interrupt_gives_identical_weights(tmp_path, source):
    """gpt2 has dropout, so the restored RNG matters as much as the weights, optimizer and data order."""
    data = (lambda: _examples()) if source == "examples" else (lambda: _stream())
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=4, warmup_steps=2, schedule="cosine", checkpoint_every=2)
    ref = train(tiny_model("gpt2"), data(), _lm_loss, cfg.model_copy(update={"checkpoint_every": 0}))
    assert len(ref.log) == 6 and ref.resumed_from == 0

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt  # interrupted after step 3; the last checkpoint is step 2
        return False

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("gpt2"), data(), _lm_loss, cfg, checkpoint_dir=tmp_path, on_step=crash)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind
    res = train(tiny_model("gpt2"), data(), _lm_loss, cfg, checkpoint_dir=tmp_path)
    assert res.resumed_from == 2 and [r["step"] for r in res.log] == [1, 2, 3, 4, 5, 6]
    assert res.losses == ref.losses
    a, b = _weights(ref.model), _weights(res.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    # a finished run resumes to the end at once; other settings are refused
    again = train(tiny_model("gpt2"), data(), _lm_loss, cfg, checkpoint_dir=tmp_path)
    assert again.resumed_from == 6 and all(torch.equal(_weights(again.model)[k], a[k]) for k in a)
    with pytest.raises(ExciseError, match="other training settings"):
        train(tiny_model("gpt2"), data(), _lm_loss, cfg.model_copy(update={"lr": 2e-2}), checkpoint_dir=tmp_path)


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 2, [0.0, 0.5, 1.0, 1.0]),
    ("linear", 1, [0.0, 1.0, 2 / 3, 1 / 3]),
    ("cosine", 0, [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]),
])
def test_schedules(schedule, warmup, expected):
    res = train(tiny_model("llama"), _examples(), _lm_loss,
                TrainConfig(steps=4, lr=1e-3, batch_size=4, schedule=schedule, warmup_steps=warmup))
    assert [r["lr"] for r in res.log] == pytest.approx([1e-3 * e for e in expected])


def test_grad_accumulation_equals_a_bigger_batch():
    """Same update up to float rounding (which Adam's normalisation lifts to ~1e-3 of the learning rate)."""
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=8)
    for data in (lambda: _examples(batch_size=8), lambda: _stream(batch_size=8)):  # ready-made batches are cut too
        runs = {k: train(tiny_model("llama"), data(), _lm_loss, cfg.model_copy(update={"grad_accum_steps": k}))
                for k in (1, 2, 4)}
        ref = _weights(runs[1].model)
        for k, r in runs.items():
            assert r.losses == pytest.approx(runs[1].losses, abs=1e-5), k
            w = _weights(r.model)
            assert all(torch.allclose(w[n], ref[n], atol=1e-5) for n in ref), k
            assert r.tokens == 3 * 8 * 6
        assert any(not torch.equal(ref[n], v) for n, v in _weights(tiny_model("llama")).items())  # it did train


def test_early_stop_params_and_bad_input():
    seen = []

    def stop_at_2(step, model):
        seen.append((step, model.training))
        return step == 2

    res = train(tiny_model("llama"), _examples(), _lm_loss, TrainConfig(steps=5, lr=1e-3, batch_size=4), on_step=stop_at_2)
    assert len(res.log) == 2 and res.stopped_early and seen == [(1, True), (2, True)]
    assert not res.model.training
    # params restricts the optimizer: the other weights keep their values
    m = tiny_model("llama")
    before = _weights(m)
    only = list(m.model.layers[1].mlp.parameters())
    train(m, _examples(), _lm_loss, TrainConfig(steps=2, lr=1e-2, batch_size=4), params=only)
    changed = {k for k, v in _weights(m).items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.mlp.") for k in changed)
    with pytest.raises(ExciseError, match="loss became nan"):
        train(tiny_model("llama"), _examples(), lambda mm, b: mm(**b).loss * float("nan"), TrainConfig(steps=1))
    with pytest.raises(ExciseError, match="checkpoint_dir"):
        train(tiny_model("llama"), _examples(), _lm_loss, TrainConfig(checkpoint_every=1))
    with pytest.raises(ExciseError, match="divisible"):
        train(tiny_model("llama"), _examples(batch_size=3), _lm_loss, TrainConfig(steps=1, grad_accum_steps=2))
    with pytest.raises(ExciseError, match="at least one example"):
        train(tiny_model("llama"), [], _lm_loss, TrainConfig(steps=1))


def test_lora_fields_are_peft_fields():
    f = LoraFields()
    assert (f.r, f.lora_alpha, f.lora_dropout) == (8, 16, 0.0)
    cfg = LoraFields(r=4, use_rslora=True, target_modules="all-linear").to_peft()
    assert cfg.r == 4 and cfg.use_rslora and cfg.target_modules == "all-linear"
    with pytest.raises(ValueError, match="alpha"):
        LoraFields(alpha=16)  # excise's old name: not a peft field


def _base(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in m.state_dict().items() if "lora_" not in k}


def _train_few(model):
    return train(model, _examples(), _lm_loss, TrainConfig(steps=2, lr=5e-2, batch_size=4))


@pytest.mark.parametrize("family", DECODERS)
def test_make_trainable_every_family(family):
    from excise.models.anatomy import Anatomy

    # lora (on the attention output and MLP down-projections: peft has no default for every family):
    # only the adapter trains, the base weights are unchanged
    m = tiny_model(family)
    an = Anatomy.of(m)
    leaf = {mod: n.rsplit(".", 1)[-1] for n, mod in m.named_modules()}
    base = _base(m)
    t = make_trainable(m, "lora", LoraFields(r=2, target_modules=[leaf[an.attn_out(0)], leaf[an.mlp_down(0)]]))
    assert 0 < t.n_trainable < sum(v.numel() for v in base.values()) / 5
    _train_few(t.model)
    now = _base(t.model)
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)
    assert any(float(p.detach().abs().max()) > 0 for n, p in t.model.named_parameters() if "lora_B" in n)
    # masked_lora: nothing outside the mask moves, inside it does
    m = tiny_model(family)
    an = Anatomy.of(m)
    v = torch.zeros(an.n_layers, an.d_mlp, dtype=torch.bool)
    v[1, [2, 5]] = True
    t = make_trainable(m, "masked_lora", LoraFields(r=2), mask=Mask("neuron", v))
    base = _base(t.model)
    _train_few(t.model)
    assert t.masked.delta_outside_mask() == 0.0
    now = _base(t.model)
    assert all(torch.equal(now[k], base[k]) for k in base)
    (dw,) = [mod.get_delta_weight("default") for _, mod in t.model.named_modules() if hasattr(mod, "get_delta_weight")]
    assert float(dw.detach().abs().max()) > 0
    # full, gradient-masked: only the masked slice of the named parameter moves
    m = tiny_model(family)
    name, p0 = next((n, p) for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n)
    gm = torch.zeros_like(p0)
    gm[:, :3] = 1
    before = _weights(m)
    t = make_trainable(m, "full", mask={name: gm})
    _train_few(t.model)
    t.release()
    for k, w in _weights(m).items():
        diff = (w - before[k]).abs()
        if k == name:
            assert diff[gm == 0].max() == 0 and diff[gm == 1].max() > 0
        else:
            assert diff.max() == 0, k
    # full: everything trains
    m = tiny_model(family)
    before = _weights(m)
    t = make_trainable(m, "full")
    assert t.n_trainable == sum(p.numel() for p in m.parameters())
    _train_few(t.model)
    assert any(not torch.equal(w, before[k]) for k, w in _weights(m).items())


def test_make_trainable_bad_input():
    m = tiny_model("llama")
    with pytest.raises(ExciseError, match="needs a unit mask"):
        make_trainable(m, "masked_lora")
    with pytest.raises(ExciseError, match="takes no mask"):
        make_trainable(m, "lora", mask={"x": torch.ones(1)})
    with pytest.raises(ExciseError, match="unknown parameters"):
        make_trainable(m, "full", mask={"nope": torch.ones(1)})
    with pytest.raises(ExciseError, match="chooses its modules"):
        make_trainable(m, "masked_lora", LoraFields(target_modules=["q_proj"]),
                       mask=Mask("neuron", torch.ones(2, 128, dtype=torch.bool)))
    with pytest.raises(ExciseError, match="unknown training method"):
        make_trainable(m, "adapters")


def test_finetune_resumes_a_lora_run(tmp_path):
    """The fine-tune stage through train(): a LoRA run interrupted after step 3 resumes from step 2 to the same adapter."""
    from excise.intervene import lora
    from excise.testing import tiny_handle

    ex = [lora.ChoiceExample(f"question {i}: pick", (" alpha", " beta gamma", " delta"), i % 3) for i in range(12)]
    cfg = lora.FinetuneConfig(steps=4, batch_size=4, lr=1e-2, checkpoint_every=2)
    ref = lora.finetune(tiny_handle("llama"), ex, cfg.model_copy(update={"checkpoint_every": 0}))

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        lora.finetune(tiny_handle("llama"), ex, cfg, checkpoint_dir=tmp_path, on_step=crash)
    res = lora.finetune(tiny_handle("llama"), ex, cfg, checkpoint_dir=tmp_path)
    assert res.losses == ref.losses
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert any("lora_B" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_update():
    """Recomputing activations in the backward pass changes memory, not the arithmetic."""
    import copy

    base = tiny_model("llama")
    ids = torch.randint(0, base.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        return m(input_ids=ids, labels=ids).loss

    runs = []
    for ckpt in (False, True):
        m = copy.deepcopy(base)
        m.train()
        train(m, lambda step: {"x": torch.zeros(4)}, loss_fn, TrainConfig(steps=2, lr=1e-2, gradient_checkpointing=ckpt))
        runs.append(m)
    for (n, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert not runs[1].is_gradient_checkpointing
