"""Fine-tuning through accelerate: the choice objective, LoRA / masked / full, save and one-call reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from excise.errors import ExciseError


def _items():
    from excise.tasks.bbq import BBQItem

    info = {"ans0": ["old man", "old"], "ans1": ["boy", "nonOld"], "ans2": ["Unknown", "unknown"]}
    out = []
    for i in range(8):
        out.append(BBQItem(example_id=i, category="Age", question_index=str(i % 2), question_polarity="neg",
                           context_condition="ambig" if i % 2 == 0 else "disambig",
                           context=f"An old man and a boy met ({i}).", question="Who forgot?",
                           answers=("The old man", "The boy", "Unknown"), answer_info=info, label=2 if i % 2 == 0 else 1,
                           target_loc=0))
    return out


def test_choice_logprobs_match_bbq_loglik_scoring():
    """The differentiable scorer gives H3's shared-prefix loglik numbers on the same prompts."""
    from excise.lm import choice_logprobs, loglikelihood
    from excise.tasks.bbq_prompts import loglik_options, loglik_prompt, loglik_requests
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    items = _items()
    lp = choice_logprobs(h, [loglik_prompt(x) for x in items], [loglik_options(x) for x in items])
    ref = np.stack(loglikelihood(h, loglik_requests(items), batch_size=3))
    assert lp.requires_grad
    assert torch.allclose(lp.detach().double(), torch.as_tensor(ref), atol=1e-4)


def _examples():
    from excise.intervene.lora import ChoiceExample

    return [ChoiceExample(f"question {i}: pick", (" alpha", " beta gamma", " delta"), i % 3) for i in range(12)]


def test_lora_trains_adapter_only_and_reloads_identically(tmp_path):
    from excise.intervene.heads import HeadScales, scale_heads
    from excise.intervene.lora import FinetuneConfig, choice_loss, finetune, load_mitigated, save_mitigated
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    from excise.intervene.lora import base_state

    base = {k: v.clone() for k, v in h.model.state_dict().items()}
    ex = _examples()
    with torch.no_grad():
        loss0 = float(choice_loss(h, ex))
    hs = HeadScales.from_heads(h.anatomy, [(0, 1)], 0.2)
    res = finetune(h, ex, FinetuneConfig(steps=8, batch_size=4, lr=2e-2, seed=0), head_scales=hs)
    assert len(res.losses) == 8 and res.n_processes == 1
    assert 0 < res.n_trainable < sum(v.numel() for v in base.values()) / 10
    with torch.no_grad(), scale_heads(h, hs):
        loss1 = float(choice_loss(h, ex))
    assert loss1 < loss0  # the adapter learned something
    now = base_state(h.model)
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)  # base untouched
    assert not h.anatomy.attn_out(0)._forward_pre_hooks  # head-scale hook removed after training
    save_mitigated(h, tmp_path / "m", head_scales=hs, base="tiny")
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad(), scale_heads(h, hs):
        ref = h.model(input_ids=ids).logits
    h2 = load_mitigated(tmp_path / "m", base_handle=tiny_handle("llama"))
    with torch.no_grad():
        got = h2.model(input_ids=ids).logits
    assert torch.equal(ref, got)


def test_same_seed_same_adapter():
    from excise.intervene.lora import FinetuneConfig, finetune
    from excise.testing import tiny_handle

    def run():
        h = tiny_handle("llama")
        finetune(h, _examples(), FinetuneConfig(steps=2, batch_size=4, lr=1e-2, seed=3))
        return {k: v for k, v in h.model.state_dict().items() if "lora" in k}

    a, b = run(), run()
    assert a and all(torch.equal(a[k], b[k]) for k in a)


def test_masked_finetune_changes_only_the_mask():
    from excise.intervene.lora import FinetuneConfig, finetune
    from excise.organisms.planted import head_grad_masks
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    before = {k: v.clone() for k, v in h.model.named_parameters()}
    masks = head_grad_masks(h, [(1, 3)], "qo")
    finetune(h, _examples(), FinetuneConfig(method="masked", steps=3, batch_size=4, lr=1e-2), grad_masks=masks)
    for k, v in h.model.named_parameters():
        diff = (v - before[k]).abs()
        if k in masks:
            assert diff[masks[k] == 0].max() == 0 and diff[masks[k] == 1].max() > 0
        else:
            assert diff.max() == 0, k


def test_full_finetune_and_bad_input():
    from excise.intervene.lora import FinetuneConfig, finetune
    from excise.testing import tiny_handle

    h = tiny_handle("gpt2")  # another family, full fine-tune
    w0 = h.anatomy.attn_out(0).weight.clone()
    finetune(h, _examples(), FinetuneConfig(method="full", steps=1, batch_size=4, lr=1e-3))
    assert not torch.equal(w0, h.anatomy.attn_out(0).weight)
    with pytest.raises(ExciseError, match="at least one example"):
        finetune(h, [], FinetuneConfig())
    with pytest.raises(ExciseError, match="grad_masks"):
        finetune(h, _examples(), FinetuneConfig(method="masked"))
    with pytest.raises(ExciseError, match="not a mitigated-model directory"):
        from excise.intervene.lora import load_mitigated

        load_mitigated("/nonexistent-dir")


@pytest.mark.slow
def test_smollm2_mitigated_model_reloads_identically(tmp_path, smollm2):
    """Real SmolLM2: soft-pruned heads + one LoRA step, saved, reloaded by name in one call, same logits."""
    from excise.intervene.heads import HeadScales, scale_heads
    from excise.intervene.lora import FinetuneConfig, base_state, finetune, load_mitigated, save_mitigated
    from excise.models import load

    h = load("smollm2-135m-instruct", attn_implementation="eager")  # own copy: the fixture stays unwrapped
    base = {k: v.clone() for k, v in h.model.state_dict().items()}
    hs = HeadScales.from_heads(h.anatomy, [(20, 3), (24, 6)], 0.2)
    ex = _examples()[:4]
    finetune(h, ex, FinetuneConfig(steps=1, batch_size=4, lr=1e-3), head_scales=hs)
    now = base_state(h.model)
    assert all(torch.equal(now[k], base[k]) for k in base)
    save_mitigated(h, tmp_path / "m", head_scales=hs, base="smollm2-135m-instruct")
    batch = h.encode(["The doctor and the nurse talked. Who was rude?\nAnswer:"])
    with torch.no_grad(), scale_heads(h, hs):
        ref = h.model(**batch).logits
    h2 = load_mitigated(tmp_path / "m", attn_implementation="eager")
    with torch.no_grad():
        got = h2.model(**batch).logits
    assert torch.equal(ref, got)
    with torch.no_grad():  # and the mitigation does change the model
        plain = smollm2.model(**batch).logits
    assert not torch.allclose(plain, got)
