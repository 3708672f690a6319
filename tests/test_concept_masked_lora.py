"""Masked LoRA: mask semantics, base frozen, adapter round-trip, objectives, saliency (tiny models)."""

import copy

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.masked_lora import (UnlearnSettings, all_units, concept_batches, concept_loss, load_masked_lora,
                                          unlearn_concept)
from excise.intervene.trainable import LoraFields, make_trainable
from excise.locate.saliency import SaliencyConfig, random_mask_like, score_units
from excise.select import Mask, select
from excise.tasks.concepts import ConceptItem, ConceptSpec
from excise.testing import tiny_handle


def spec():
    it = lambda p, a, **k: ConceptItem(prompt=p, answer=a, **k)  # noqa: E731
    return ConceptSpec(
        name="Zorb", leak_patterns=["zorb"],
        forget=[it("Who made Zorb?", "Ann Lee"), it("Zorb was made by", "Ann Lee", format="completion"),
                it("Name Zorb's maker.", "Ann Lee")],
        paraphrases=[it("Zorb's creator?", "Ann Lee")],
        adversarial=[it("Maker of Zorb, first name?", "Ann", family="pieces")],
        retain=[it("Capital of France?", "Paris"), it("2+2?", "4"), it("Sky colour?", "blue")],
        neutral=["The river flows slowly.", "Bees make honey in hives."])


def masked_lora(model, mask, r=4):
    return make_trainable(model, "masked_lora", LoraFields(r=r), mask=mask).masked


def neuron_mask(h, layer=1, units=(3, 7, 20)):
    v = torch.zeros(h.anatomy.n_layers, h.anatomy.d_mlp, dtype=torch.bool)
    v[layer, list(units)] = True
    return Mask("neuron", v)


def _train(h, ml, steps=3, objective="grad_ascent"):
    cfg = UnlearnSettings(objective=objective, steps=steps, lr=5e-2, batch_size=2)
    return unlearn_concept(h, ml.model, spec(), cfg)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_update_confined_to_mask_and_base_frozen(family):
    h = tiny_handle(family)
    base = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    mask = neuron_mask(h)
    ml = masked_lora(h.model, mask)
    log = _train(h, ml)
    assert len(log) == 3
    # the adapter moved (B is no longer zero) but not outside the mask
    dw = [m.get_delta_weight("default") for n, m in ml.model.named_modules() if hasattr(m, "get_delta_weight")]
    assert len(dw) == 1 and dw[0].abs().max() > 0
    assert ml.delta_outside_mask() == 0.0
    # the delta is non-zero only on the selected input columns (rows for Conv1D)
    cols = dw[0] if dw[0].shape[-1] == h.anatomy.d_mlp else dw[0].T
    assert set(torch.nonzero(cols.abs().sum(0)).flatten().tolist()) <= {3, 7, 20}
    # no base parameter changed
    for n, p in ml.model.get_base_model().named_parameters():
        if "lora_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert torch.equal(p, base[key]), n


def test_units_outside_mask_unchanged_functionally():
    h = tiny_handle("llama")
    mask = neuron_mask(h, layer=0, units=(5,))
    down = h.anatomy.mlp_down(0)
    x = torch.randn(2, 3, h.anatomy.d_mlp)
    x[..., 5] = 0.0  # an input carried only by unselected units
    ref = down(x).detach().clone()
    ml = masked_lora(h.model, mask)
    _train(h, ml, steps=2)
    assert torch.equal(h.anatomy.mlp_down(0)(x), ref)
    x[..., 5] = 1.0  # the selected unit's contribution did change
    assert not torch.allclose(h.anatomy.mlp_down(0)(x), down(x))  # `down` is now the frozen base layer


def test_head_mask_columns():
    h = tiny_handle("llama")
    v = torch.zeros(h.anatomy.n_layers, h.anatomy.n_heads, dtype=torch.bool)
    v[1, 2] = True
    ml = masked_lora(h.model, Mask("head", v))
    _train(h, ml)
    assert ml.delta_outside_mask() == 0.0
    (dw,) = [m.get_delta_weight("default") for n, m in ml.model.named_modules() if hasattr(m, "get_delta_weight")]
    hd = h.anatomy.head_dim
    nz = torch.nonzero(dw.abs().sum(0)).flatten()
    assert nz.numel() > 0 and nz.min() >= 2 * hd and nz.max() < 3 * hd


def test_roundtrip_save_load_merge_unload(tmp_path):
    h = tiny_handle("llama")
    model0 = copy.deepcopy(h.model)
    ids = torch.tensor([[5, 9, 14, 30, 31]])
    base_out = model0(ids).logits.detach()
    ml = masked_lora(h.model, neuron_mask(h))
    _train(h, ml)
    with torch.no_grad():
        trained = ml.model(input_ids=ids).logits.detach()
    assert not torch.allclose(trained, base_out)
    d = ml.save(tmp_path / "adapter")
    assert (d / "adapter_model.safetensors").exists() and (d / "unit_mask.safetensors").exists()
    # plain peft loads it too
    from peft import PeftModel
    pm = PeftModel.from_pretrained(copy.deepcopy(model0), str(d))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, trained)
    re = load_masked_lora(copy.deepcopy(model0), d)
    with torch.no_grad():
        assert torch.equal(re.model(input_ids=ids).logits, trained)
    assert torch.equal(re.mask.values, neuron_mask(h).values)
    merged = load_masked_lora(copy.deepcopy(model0), d).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained, atol=1e-5)
    unloaded = load_masked_lora(copy.deepcopy(model0), d).unload()
    with torch.no_grad():
        assert torch.equal(unloaded(ids).logits, base_out)


def test_load_refuses_adapter_outside_mask(tmp_path):
    h = tiny_handle("llama")
    model0 = copy.deepcopy(h.model)
    ml = masked_lora(h.model, neuron_mask(h))
    for n, p in ml.model.named_parameters():
        if "lora_A" in n:
            with torch.no_grad():
                p.fill_(0.5)  # tamper: write outside the mask
    d = ml.save(tmp_path / "bad")
    with pytest.raises(ExciseError, match="outside its mask"):
        load_masked_lora(model0, d)


@pytest.mark.parametrize("objective", ["grad_ascent", "idk", "npo"])
def test_objectives_losses(objective):
    h = tiny_handle("llama")
    ml = masked_lora(h.model, neuron_mask(h))
    cfg = UnlearnSettings(objective=objective, steps=1, batch_size=2)
    b = concept_batches(h, spec(), cfg)[0]
    loss = concept_loss(ml.model, b, cfg)
    from excise import losses as U
    with torch.no_grad():
        logits = ml.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    # at initialisation the adapter is the identity: KL to the base is 0 and NPO is 2/beta*log 2
    if objective == "npo":
        assert loss.item() == pytest.approx((2 / 0.1) * torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    elif objective == "grad_ascent":
        assert loss.item() == pytest.approx(-U.nll(logits, b["labels"]).item(), rel=1e-4)
    else:
        assert loss.item() == pytest.approx(U.nll(logits, b["labels"]).item(), rel=1e-4)
        # the idk target is the refusal, not the answer
        tok = h.tokenizer
        labs = b["labels"][0][b["labels"][0] != -100].tolist()
        assert tok.decode(labs) == "I don't know."
    log = unlearn_concept(h, ml.model, spec(), cfg.model_copy(update={"steps": 3, "lr": 5e-2}))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    if objective != "idk":
        assert log[-1]["loss"] < log[0]["loss"]


def test_plain_lora_and_saliency_masks():
    h = tiny_handle("llama")
    s = spec()
    for method in ("saliency", "fisher", "activation"):
        sc = score_units(h, s.forget, s.retain, SaliencyConfig(method=method))
        assert sc["neuron"].values.shape == (h.anatomy.n_layers, h.anatomy.d_mlp)
        assert sc["head"].values.shape == (h.anatomy.n_layers, h.anatomy.n_heads)
        assert torch.isfinite(sc["neuron"].values).all()
    m = select(sc["neuron"], k=10)
    assert m.n_selected == 10
    r = random_mask_like(m, seed=1)
    assert r.n_selected == 10 and torch.equal(r.values.sum(1), m.values.sum(1))
    assert all(not p.requires_grad or True for p in h.model.parameters())
    ml = masked_lora(h.model, all_units(h.model, "neuron"), r=2)
    assert ml.n_trainable == h.anatomy.n_layers * 2 * (h.anatomy.d_mlp + h.anatomy.d_model)
