"""UNDO noise formulas, mask semantics, distillation loss, SNMF updates."""

import math

import pytest
import torch

from excise.errors import ExciseError
from excise.intervene.undo import NoiseConfig, apply_noise, xavier_noise
from excise.locate.paramdiff import param_diff_scores, param_masks
from excise.locate.snmf import neuron_param_masks, semi_nmf
from excise.testing import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")



def _expected_noise(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (xavier_noise(p.shape, g) if p.dim() >= 2 else None) for n, p in model.named_parameters()}


def test_global_noise_formula():
    m = tiny_model("llama", seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    N = _expected_noise(m, 3)
    info = apply_noise(m, NoiseConfig(alpha=0.3, beta=0.2, seed=3))
    for n, p in m.named_parameters():
        if N[n] is None:  # vectors only shrink
            torch.testing.assert_close(p, 0.7 * before[n])
        else:
            torch.testing.assert_close(p, 0.7 * before[n] + 0.3 * 0.2 * N[n])
    assert info["noised_fraction"] == pytest.approx(1.0)


def test_alpha_zero_is_identity_and_alpha_one_reinitialises():
    m = tiny_model("llama", seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_noise(m, NoiseConfig(alpha=0.0, beta=0.1, seed=0))
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
    N = _expected_noise(m, 1)
    apply_noise(m, NoiseConfig(alpha=1.0, beta=1.0, seed=1))
    for n, p in m.named_parameters():
        if N[n] is None:
            assert torch.count_nonzero(p) == 0
        else:
            torch.testing.assert_close(p, N[n])


def test_xavier_bound():
    g = torch.Generator().manual_seed(0)
    x = xavier_noise((64, 32), g)
    bound = math.sqrt(6 / 96)
    assert x.abs().max() <= bound and x.abs().max() > 0.9 * bound


def test_masked_noise_touches_only_the_mask():
    m = tiny_model("llama", seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    name = "model.layers.0.mlp.down_proj.weight"
    w = dict(m.named_parameters())[name]
    mask = torch.zeros_like(w)
    mask[:, :5] = 1.0
    mask[:, 5] = 0.5  # relative masks: fractional values
    N = _expected_noise(m, 7)
    apply_noise(m, NoiseConfig(alpha=0.8, beta=0.1, seed=7), {name: mask})
    for n, p in m.named_parameters():
        if n != name:
            assert torch.equal(p, before[n]), n  # not named in the mask -> m = 0
    p = dict(m.named_parameters())[name]
    expect = (1 - 0.8 * mask) * before[name] + 0.8 * mask * 0.1 * N[name]
    torch.testing.assert_close(p, expect)
    assert torch.equal(p[:, 6:], before[name][:, 6:])


def test_mask_bad_input():
    m = tiny_model("llama", seed=0)
    with pytest.raises(ExciseError, match="unknown parameter"):
        apply_noise(m, NoiseConfig(), {"nope": torch.ones(1)})
    with pytest.raises(ExciseError, match="shape"):
        apply_noise(m, NoiseConfig(), {"model.layers.0.mlp.down_proj.weight": torch.ones(2, 2)})
    with pytest.raises(ExciseError, match="outside"):
        apply_noise(m, NoiseConfig(), {"model.norm.weight": torch.full((64,), 2.0)})


def test_paramdiff_masks_binary_and_relative():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    with torch.no_grad():
        for i, (n, p) in enumerate(b.named_parameters()):
            p.add_(torch.arange(p.numel()).view_as(p).float() * 1e-3 * (i + 1))
    sc = param_diff_scores(a, b)
    masks = param_masks(sc, top_p=0.1, mode="binary")
    for n, mk in masks.items():
        k = max(1, round(0.1 * mk.numel()))
        assert int(mk.sum()) == k
        # the largest differences are the last entries (arange)
        assert mk.flatten()[-1] == 1 and set(mk.unique().tolist()) <= {0.0, 1.0}
    rel = param_masks(sc, mode="relative")
    for n, mk in rel.items():
        assert float(mk.max()) == pytest.approx(1.0) and float(mk.min()) >= 0
    with pytest.raises(ExciseError):
        param_masks(sc, top_p=0)


def test_neuron_masks_map_to_down_projection_inputs():
    m = tiny_model("llama", seed=0)
    nm = torch.zeros(2, 128, dtype=torch.bool)
    nm[1, [3, 7]] = True
    masks = neuron_param_masks(m, nm)
    w = masks["model.layers.1.mlp.down_proj.weight"]
    assert w.shape == (64, 128) and torch.equal(w.sum(0).nonzero().flatten(), torch.tensor([3, 7]))
    assert masks["model.layers.0.mlp.down_proj.weight"].sum() == 0
    with pytest.raises(ExciseError):
        neuron_param_masks(m, torch.zeros(3, 128))


def test_snmf_lowers_error_and_keeps_coefficients_nonnegative():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(30, 4, generator=g)
    G = torch.rand(200, 4, generator=g)
    X = F @ G.T + 0.01 * torch.randn(30, 200, generator=g)
    res = semi_nmf(X, 4, iters=60, seed=0)
    errs = res.errors
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0] and errs[-1] < 0.2
    assert (res.G >= 0).all()
    with pytest.raises(ExciseError):
        semi_nmf(X, 0)


def test_distillation_loss_is_zero_for_identical_models():
    from excise.intervene.undo import DistillConfig, distill
    from excise.losses import kl_to_ref
    from excise.tasks.arithmetic import OPS, train_stream
    from excise.testing import ByteTokenizer

    m = tiny_model("llama", seed=0)
    x = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        lg = m(input_ids=x).logits
    assert float(kl_to_ref(lg, lg)) == pytest.approx(0.0, abs=1e-6)
    student = tiny_model("llama", seed=0)
    res = distill(student, m, ByteTokenizer(), train_stream(OPS, 0), DistillConfig(max_steps=1, batch_size=4))
    assert res["steps"] == 1 and res["final_kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["flops"] == 6.0 * sum(p.numel() for p in student.parameters()) * res["tokens"]


def test_distill_trains_a_student_copied_from_a_frozen_teacher():
    import copy

    from excise.intervene.undo import DistillConfig, distill
    from excise.tasks.arithmetic import OPS, train_stream
    from excise.testing import ByteTokenizer

    teacher = tiny_model("llama", seed=0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    apply_noise(student, NoiseConfig(alpha=0.5, seed=0))
    before = [p.detach().clone() for p in student.parameters()]
    res = distill(student, teacher, ByteTokenizer(), train_stream(OPS, 0), DistillConfig(max_steps=2, batch_size=2))
    assert res["steps"] == 2 and res["final_kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
