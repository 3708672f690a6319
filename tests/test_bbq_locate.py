"""Head localization on BBQ pairs: pairing, log-odds, correlation, attribution vs real ablation, planted head found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from excise.errors import ExciseError


def _pairs(n=8):
    """Short synthetic BBQ pairs (ambiguous + disambiguated version of one template)."""
    from excise.tasks.bbq import BBQItem

    info = {"ans0": ["old man", "old"], "ans1": ["girl", "nonOld"], "ans2": ["Unknown", "unknown"]}
    out = []
    for i in range(n):
        pol = "neg" if i % 2 == 0 else "nonneg"
        ctx = f"An old man and a girl ({i})."
        common = dict(category="Age", question_index=str(i), question_polarity=pol, question="Who?",
                      answers=("The old man", "The girl", "Unknown"), answer_info=info,
                      target_loc=0 if pol == "neg" else 1)
        out.append(BBQItem(example_id=2 * i, context_condition="ambig", context=ctx, label=2, **common))
        out.append(BBQItem(example_id=2 * i + 1, context_condition="disambig", context=ctx + " The girl did.",
                           label=1, **common))
    return out


def test_pairs_on_real_bbq():
    from excise.locate.heads import pair_items
    from excise.tasks.bbq import load_bbq

    items = load_bbq(["Religion"], limit_per_category=200)
    pairs = pair_items(items)
    assert len(pairs) >= 40
    for a, d in pairs:
        assert a.context_condition == "ambig" and d.context_condition == "disambig"
        assert (a.question_index, a.question_polarity, a.answers) == (d.question_index, d.question_polarity, d.answers)
        assert d.context.startswith(a.context.strip()[:40])
    assert len({id(d) for _, d in pairs}) == len(pairs)


def test_biased_logodds_by_hand():
    from excise.locate.heads import biased_logodds

    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    lo = biased_logodds(lp, torch.tensor([0, 2]))
    assert torch.allclose(lo, torch.tensor([0.0, math.log(0.3 / 0.7)]), atol=1e-6)
    # unnormalised log-likelihoods: only the softmax over options matters
    assert torch.allclose(biased_logodds(lp - 5.0, torch.tensor([0, 2])), lo, atol=1e-5)


def test_pearson_matches_numpy_and_nan_when_constant():
    from excise.locate.heads import _pearson

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    x[:, 2] = 1.0
    y = x[:, 0] * 2 + rng.normal(size=30)
    r, p = _pearson(x, y)
    assert r[0] == pytest.approx(np.corrcoef(x[:, 0], y)[0, 1])
    assert p[0] < 1e-3 and math.isnan(r[2]) and math.isnan(p[2])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribution_estimate_tracks_real_ablation(family):
    from excise.locate.heads import HeadAttributionConfig, attribute_heads
    from excise.testing import tiny_handle

    h = tiny_handle(family)
    att = attribute_heads(h, _pairs(), HeadAttributionConfig(n_candidates=0, batch_size=16))
    L, H = h.anatomy.n_layers, h.anatomy.n_heads
    assert att.scores.kind == "head" and tuple(att.scores.values.shape) == (L, H)
    assert np.isfinite(att.ablation).all()  # n_candidates=0 ablates every head
    # attribution patching is a first-order estimate of the measured ablation effect
    assert np.corrcoef(att.estimate.flatten(), att.ablation.flatten())[0, 1] > 0.8
    rows = att.rows()
    assert [r["rank"] for r in rows] == list(range(1, L * H + 1))
    assert rows[0]["score"] == pytest.approx(float(np.nanmax(att.ablation)))
    assert all(np.isfinite(r["correlation"]) for r in rows)


def test_planted_head_is_found():
    """Plant a bias in one head of a tiny model (masked fine-tune); the localizer ranks it first."""
    from excise.intervene.lora import ChoiceExample, FinetuneConfig, finetune
    from excise.locate.heads import HeadAttributionConfig, attribute_heads
    from excise.tasks.bbq_prompts import loglik_options, loglik_prompt
    from excise.organisms.planted import head_grad_masks
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    items = _pairs(8)
    amb = [x for x in items if x.context_condition == "ambig"]
    ex = [ChoiceExample(loglik_prompt(x), tuple(loglik_options(x)), x.target_loc) for x in amb]
    planted = (1, 2)
    finetune(h, ex, FinetuneConfig(method="masked", steps=10, batch_size=8, lr=3e-2),
             grad_masks=head_grad_masks(h, [planted], "qo"))
    att = attribute_heads(h, items, HeadAttributionConfig(n_candidates=2, batch_size=16))
    assert att.precision_at_k([planted]) == 1.0
    assert att.ablation[planted] > 0 and att.ablation_lo[planted] > 0  # CI excludes 0


def test_bad_input():
    from excise.locate.heads import attribute_heads
    from excise.testing import tiny_handle

    with pytest.raises(ExciseError, match="pairs"):
        attribute_heads(tiny_handle("llama"), _pairs(1))
    with pytest.raises(ExciseError, match="decoder"):
        attribute_heads(tiny_handle("bert"), _pairs(4))
