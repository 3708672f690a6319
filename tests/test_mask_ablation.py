"""Localization scored by ablation: a mask's units switched off on held-out items, against random masks."""

from __future__ import annotations

import copy

import pytest
import torch

from excise.locate import mask_ablation
from excise.select import Mask
from excise.tasks.concepts import ConceptItem
from excise.testing import tiny_handle

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [ConceptItem(prompt=f"Question {i}: who made film {i}?", answer=f"Director {i}") for i in range(6)]


def _neuron_mask(handle, picks):
    a = handle.anatomy
    v = torch.zeros(a.n_layers, a.d_mlp, dtype=torch.bool)
    for layer, unit in picks:
        v[layer, unit] = True
    return Mask("neuron", v)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_neuron_ablation_equals_zeroing_their_output_weights(family):
    """Ablating neurons at mlp.L.hidden is the same model as one whose down-projection ignores them."""
    handle = tiny_handle(family)
    mask = _neuron_mask(handle, [(0, 1), (0, 5), (1, 3)])
    ablated = mask_ablation.token_logprobs(handle, ITEMS, mask)
    model = copy.deepcopy(handle.model)
    for layer, unit in mask.units():
        w = _down_proj(model, family, layer).weight
        with torch.no_grad():
            if family == "gpt2":  # Conv1D stores [in, out]
                w[unit, :] = 0
            else:
                w[:, unit] = 0
    manual = mask_ablation.token_logprobs(handle.with_model(model), ITEMS)
    assert ablated == pytest.approx(manual, abs=1e-5)
    assert not ablated == pytest.approx(mask_ablation.token_logprobs(handle, ITEMS), abs=1e-6)  # it did something


def _down_proj(model, family, layer):
    return model.transformer.h[layer].mlp.c_proj if family == "gpt2" else model.model.layers[layer].mlp.down_proj


def test_scores_are_paired_against_random_units_of_equal_count():
    handle = tiny_handle("llama")
    a = handle.anatomy
    full_layer = Mask("neuron", torch.zeros(a.n_layers, a.d_mlp, dtype=torch.bool))
    full_layer.values[0] = True  # every neuron of layer 0: its random twin is the same mask
    heads = Mask("head", torch.zeros(a.n_layers, a.n_heads, dtype=torch.bool))
    heads.values[1, 0] = True
    res = mask_ablation.score_masks(handle, {"layer0": full_layer, "head": heads},
                                    {"forget_heldout": ITEMS[:3], "retain": ITEMS[3:]}, n_random=2)
    s = res["masks"]["layer0"]["sets"]["forget_heldout"]
    assert res["masks"]["layer0"]["n_units"] == a.d_mlp and s["selected"]["n"] == 3
    assert s["selected"]["value"] == pytest.approx(s["random"]["value"])
    assert s["selected_minus_random"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert s["selected"]["value"] != 0.0  # switching off a whole MLP layer changes the answers' probability
    h = res["masks"]["head"]["sets"]["retain"]
    assert h["selected"]["n"] == 3 and h["selected"]["value"] != 0.0
    md = mask_ablation.markdown(res)
    assert "| layer0 | " in md and "| head | 1 | retain |" in md
