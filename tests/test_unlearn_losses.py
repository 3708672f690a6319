"""Unlearning objectives on hand-checked small cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from excise.losses import (
    IGNORE, grad_ascent, grad_diff, kl_to_ref, maxent, nll, npo, rmu, sequence_logprob,
)

V = 7


def _batch(seed=0, B=2, T=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE  # a prompt that does not count
    return logits, labels


def test_nll_matches_cross_entropy_with_shift():
    logits, labels = _batch()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(nll(logits, labels), ref)


def test_nll_by_hand_tiny():
    # one sequence, two tokens: logits at t=0 predict label at t=1
    logits = torch.zeros(1, 2, 3)
    logits[0, 0] = torch.tensor([math.log(2.0), 0.0, 0.0])  # p = [1/2, 1/4, 1/4]
    labels = torch.tensor([[IGNORE, 0]])
    assert nll(logits, labels).item() == pytest.approx(math.log(2.0))
    labels = torch.tensor([[IGNORE, 1]])
    assert nll(logits, labels).item() == pytest.approx(math.log(4.0))
    assert sequence_logprob(logits, labels).item() == pytest.approx(-math.log(4.0))


def test_grad_ascent_is_minus_nll_and_grad_diff():
    logits, labels = _batch()
    assert grad_ascent(logits, labels).item() == pytest.approx(-nll(logits, labels).item())
    r_logits, r_labels = _batch(seed=1)
    gd = grad_diff(logits, labels, r_logits, r_labels, retain_weight=2.0)
    assert gd.item() == pytest.approx(-nll(logits, labels).item() + 2.0 * nll(r_logits, r_labels).item())


def test_sequence_logprob_sums_counted_tokens():
    logits, labels = _batch()
    lp = torch.log_softmax(logits[:, :-1], -1)
    lab = labels[:, 1:]
    expected = torch.stack([
        sum(lp[b, t, lab[b, t]] for t in range(lab.shape[1]) if lab[b, t] != IGNORE) for b in range(2)
    ])
    torch.testing.assert_close(sequence_logprob(logits, labels), expected)


def test_maxent_zero_for_uniform_positive_otherwise():
    labels = torch.zeros(2, 4, dtype=torch.long)
    assert maxent(torch.zeros(2, 4, V), labels).item() == pytest.approx(0.0, abs=1e-6)
    assert maxent(torch.full((2, 4, V), 3.0), labels).item() == pytest.approx(0.0, abs=1e-6)
    logits, labels = _batch()
    # KL(U || p) by hand
    lp = torch.log_softmax(logits[:, :-1], -1)
    kl = (-math.log(V) - lp.mean(-1))
    m = (labels[:, 1:] != IGNORE).float()
    assert maxent(logits, labels).item() == pytest.approx(((kl * m).sum() / m.sum()).item(), rel=1e-5)
    assert maxent(logits, labels).item() > 0


def test_npo_at_reference_is_2_over_beta_log2():
    logits, labels = _batch()
    for beta in (0.1, 0.5, 2.0):
        assert npo(logits, logits.clone(), labels, beta=beta).item() == pytest.approx((2 / beta) * math.log(2), rel=1e-6)
    # hand value away from the reference: delta = logp - ref per sequence
    other, _ = _batch(seed=3)
    delta = sequence_logprob(other, labels) - sequence_logprob(logits, labels)
    expected = -(2 / 0.1) * F.logsigmoid(-0.1 * delta).mean()
    assert npo(other, logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_npo_gradient_goes_only_to_the_policy():
    logits, labels = _batch()
    pol = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    npo(pol, ref, labels).backward()
    assert pol.grad is not None and pol.grad.abs().sum() > 0
    assert ref.grad is None
    # descending the NPO loss lowers the forget log-likelihood
    with torch.no_grad():
        after = pol - 1.0 * pol.grad
    assert (sequence_logprob(after, labels) < sequence_logprob(logits, labels)).all()


def test_kl_to_ref():
    logits, _ = _batch()
    assert kl_to_ref(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other, _ = _batch(seed=5)
    kl = kl_to_ref(logits, other)
    q = torch.softmax(other, -1)
    expected = (q * (torch.log_softmax(other, -1) - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5) and kl.item() > 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    per_tok = (q * (torch.log_softmax(other, -1) - torch.log_softmax(logits, -1))).sum(-1)
    assert kl_to_ref(logits, other, mask).item() == pytest.approx((per_tok[mask.bool()].mean()).item(), rel=1e-5)


def test_rmu():
    g = torch.Generator().manual_seed(0)
    D = 8
    u = torch.randn(D, generator=g)
    control = 6.5 * u / u.norm()
    forget = control.expand(2, 3, D).clone()
    retain = torch.randn(2, 3, D, generator=g)
    assert rmu(forget, retain, retain.clone(), control).item() == 0.0
    # hand value: forget term mse + alpha * retain term mse
    forget2 = forget + 1.0
    retain2 = retain + 0.5
    val = rmu(forget2, retain2, retain, control, alpha=10.0)
    assert val.item() == pytest.approx(1.0 + 10.0 * 0.25, rel=1e-6)
    m = torch.tensor([[1, 0, 0], [0, 0, 0]])
    forget3 = forget.clone()
    forget3[1] += 3.0  # masked out
    assert rmu(forget3, retain, retain, control, forget_mask=m).item() == pytest.approx(0.0, abs=1e-7)


def test_all_ignored_labels_give_zero_not_nan():
    logits = torch.randn(1, 3, V)
    labels = torch.full((1, 3), IGNORE)
    assert nll(logits, labels).item() == 0.0
    assert sequence_logprob(logits, labels).item() == 0.0
