"""One battery for every registered localizer and intervention, on tiny models of every decoder family.

Like PEFT's shared tuner tests: a method that registers itself is run here without a test of
its own being written. Localizers must return Scores of their unit kind and leave the model
untouched; interventions must return a new handle, leave the caller's model untouched, change
the model, and (for masked methods) change nothing outside the mask.
"""

from __future__ import annotations

import copy

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene import INTERVENTIONS
from excise.locate import LOCALIZERS, Example, LocateData
from excise.select import Mask, select
from excise.testing import DECODERS, tiny_handle
from excise.units import aggregate_param_scores, unit_param_masks

# small settings so the whole battery stays fast; defaults everywhere else
SMALL = {"snmf": {"k": 4, "iters": 10, "n_forget_features": 2}, "heads": {"n_candidates": 2, "batch_size": 4},
         "saliency": {"batch_size": 4}, "fisher": {"batch_size": 4, "unit": "head"},
         "paramdiff": {"unit": "neuron"}, "random": {"unit": "head"}}
INTERVENTION_SMALL: dict[str, dict] = {"head_scale": {"scale": 0.0}, "masked_lora": {"steps": 2, "batch_size": 2},
                                       "noise": {"alpha": 0.1}, "unlearn": {"steps": 2, "batch_size": 2}}


def _bbq_pairs(n: int = 6):
    """Six synthetic pairs: head attribution needs 3 per half (selection / measurement)."""
    from test_bbq_locate import _pairs  # tests/ is on sys.path (rootdir conftest)

    return _pairs(n)


def _data(h) -> LocateData:
    forget = [Example(f"Q{i}: who directed it? A:", " Nolan") for i in range(4)]
    retain = [Example(f"Q{i}: two plus two? A:", " four") for i in range(4)]
    ref = copy.deepcopy(h)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return LocateData(forget, retain, _bbq_pairs(), ref)


def _state(h):
    return {k: v.clone() for k, v in h.model.state_dict().items()}


@pytest.fixture(scope="module", params=DECODERS)
def handle(request):
    return tiny_handle(request.param, seed=0)


@pytest.mark.parametrize("name", LOCALIZERS.names())
def test_localizer(handle, name, one_thread):
    loc = LOCALIZERS.build(name, SMALL.get(name, {}))
    data = _data(handle)
    before = _state(handle)
    grads = [p.requires_grad for p in handle.model.parameters()]
    sc = loc.score(handle, data)
    an = handle.anatomy
    width = {"head": an.n_heads, "neuron": an.d_mlp}
    assert sc.kind in ("head", "neuron", "param")
    if sc.kind != "param":
        assert tuple(sc.values.shape) == (an.n_layers, width[sc.kind])
        assert select(sc, k=2).n_selected >= 1
    after = _state(handle)
    assert all(torch.equal(before[k], after[k]) for k in before), "a localizer changed the model"
    assert grads == [p.requires_grad for p in handle.model.parameters()]


def _mask_for(h, kind: str) -> Mask:
    an = h.anatomy
    width = an.n_heads if kind == "head" else an.d_mlp
    m = torch.zeros(an.n_layers, width, dtype=torch.bool)
    m[0, 1] = True
    m[-1, 0] = True
    return Mask(kind, m)


@pytest.mark.parametrize("name", INTERVENTIONS.names())
def test_intervention(handle, name, one_thread):
    cls = INTERVENTIONS.get(name)
    iv = INTERVENTIONS.build(name, INTERVENTION_SMALL.get(name, {}))
    data = _data(handle)
    for kind in [k for k in cls.accepts]:
        mask = None if kind is None else _mask_for(handle, kind)
        before = _state(handle)
        new = iv.apply(handle, mask, data)
        assert new is not handle and new.model is not handle.model
        assert all(torch.equal(before[k], v) for k, v in _state(handle).items()), "the caller's model changed"
        changed = {k for k, v in _state(new).items() if k in before and not torch.equal(before[k], v)}
        assert changed, f"{name} with a {kind} mask changed nothing"
        if kind in ("head", "neuron") and getattr(iv, "masked", True):
            allowed = unit_param_masks(handle.anatomy, kind, mask.values)
            for k in changed:
                assert k in allowed, f"{name}: {k} changed although it holds no masked unit"
                delta = (_state(new)[k] - before[k]).abs()
                assert float(delta[allowed[k] == 0].max()) == 0.0, f"{name}: {k} changed outside the mask"


def test_wrong_mask_kind_is_one_line(handle):
    iv = INTERVENTIONS.build("head_scale", {})
    with pytest.raises(ExciseError, match="takes: head"):
        iv.apply(handle, _mask_for(handle, "neuron"), _data(handle))


def test_unknown_names_are_one_line():
    with pytest.raises(ExciseError, match="unknown localizer 'nope'; choose one of"):
        LOCALIZERS.build("nope")
    with pytest.raises(ExciseError, match="unknown setting"):
        LOCALIZERS.build("fisher", {"bogus": 1})


def test_param_scores_aggregate_to_units_and_back(handle):
    an = handle.anatomy
    values = {n: torch.ones_like(p) for n, p in handle.model.named_parameters()}
    from excise.units import Scores

    heads = aggregate_param_scores(Scores("param", values), an, "head")
    name = an.module_name(an.attn_out(0)) + ".weight"
    per_head = values[name].numel() / an.n_heads
    assert torch.allclose(heads.values, torch.full_like(heads.values, per_head))
    neurons = aggregate_param_scores(Scores("param", values), an, "neuron")
    assert tuple(neurons.values.shape) == (an.n_layers, an.d_mlp)
    pm = unit_param_masks(an, "head", _mask_for(handle, "head").values)
    assert float(pm[name].sum()) == an.head_dim * an.d_model  # one head of layer 0: its columns
