"""End-to-end on the real SmolLM2-135M-Instruct (slow): it knows Inception's director; a masked LoRA lowers that knowledge only through its mask."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_knows_and_masked_lora_forgets(smollm2):
    from excise.intervene.masked_lora import UnlearnSettings, unlearn_concept
    from excise.intervene.trainable import LoraFields, make_trainable
    from excise.locate.saliency import SaliencyConfig, score_units
    from excise.measure.unlearning import answer_logprobs, generate
    from excise.select import select
    from excise.tasks.concepts import load_concept

    torch.set_num_threads(1)
    h = smollm2
    spec = load_concept("inception")
    direct = [spec.forget[0], spec.forget[6]]  # chat question and plain completion
    gens = generate(h, direct, max_new_tokens=12)
    assert all("Nolan" in g for g in gens), gens  # the base model knows it in both formats
    sub = spec.model_copy(update={"forget": direct, "retain": spec.retain[11:13]})
    before = [r["logprob"] for r in answer_logprobs(h, direct)]
    sc = score_units(h, sub.forget, sub.retain, SaliencyConfig(method="saliency"))
    mask = select(sc["neuron"], k=64)
    import copy

    model = copy.deepcopy(h.model)
    ml = make_trainable(model, "masked_lora", LoraFields(r=4), mask=mask).masked
    vh = copy.copy(h)
    vh.model = model
    unlearn_concept(vh, ml.model, sub, UnlearnSettings(objective="grad_ascent", steps=3, lr=2e-3, batch_size=2,
                                                       retain_weight=0.0))
    after = [r["logprob"] for r in answer_logprobs(vh, direct)]
    assert sum(after) < sum(before) - 1.0, (before, after)
    assert ml.delta_outside_mask() == 0.0
    base_names = dict(h.model.named_parameters())
    for n, p in ml.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_names[n.replace(".base_layer", "")]), n
