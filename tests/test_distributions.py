"""The distribution functions against hand values and torch.distributions (SPEC.md: unimix
0.01, straight-through one-hot samples, bounded normal actor, Bernoulli continue)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreamer_trl.distributions import (
    binary_log_prob,
    bounded_normal,
    categorical_entropy,
    categorical_kl,
    log_softmax_small,
    mode_onehot,
    normal_entropy,
    normal_log_prob,
    sample_onehot,
    sample_onehot_st,
    sample_probs,
    softmax_small,
    unimix_logits,
)
from dreamer_trl.heads import Actor

# --------------------------------------------------------------------------- unimix


def test_unimix_three_classes_hand_values():
    # softmax(log [1, 2, 3]) = [1/6, 2/6, 3/6]; mixed: 0.99·p + 0.01/3
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    probs = unimix_logits(logits, 0.01).exp()
    expected = torch.tensor(
        [0.99 / 6 + 0.01 / 3, 0.99 * 2 / 6 + 0.01 / 3, 0.99 * 3 / 6 + 0.01 / 3],
        dtype=torch.float64,
    )
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)


def test_unimix_two_classes_saturated_and_uniform():
    logits = torch.tensor([[100.0, -100.0], [0.0, 0.0]], dtype=torch.float64)
    probs = unimix_logits(logits, 0.01).exp()
    expected = torch.tensor([[0.995, 0.005], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)


def test_unimix_rows_sum_to_one_and_floor():
    torch.manual_seed(0)
    logits = 20 * torch.randn(64, 32, 4)
    logp = unimix_logits(logits, 0.01)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(64, 32))
    assert logp.exp().min().item() >= 0.01 / 4 * (1 - 1e-5)


def test_unimix_zero_is_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    torch.testing.assert_close(unimix_logits(logits, 0.0), torch.log_softmax(logits, -1))


# --------------------------------------------------------------------------- one-hot samples


def test_straight_through_sample_value_is_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(200, 5)
    sample = sample_onehot_st(logits)
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sample.sum(-1), torch.ones(200))


def test_straight_through_gradient_is_softmax_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 6, dtype=torch.float64)
    (sample_onehot_st(logits) * weights).sum().backward()
    st_grad = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits, -1) * weights).sum().backward()
    torch.testing.assert_close(st_grad, logits.grad, rtol=1e-12, atol=1e-12)
    assert st_grad.abs().sum() > 0


def test_sample_onehot_frequencies_match_probs():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.3, 0.6])
    logits = torch.log(probs).expand(20000, 3)
    freq = sample_onehot(logits).mean(0)
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


def test_sample_probs_never_picks_a_zero_probability_class():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5]).expand(5000, 4)
    counts = sample_probs(probs).sum(0)
    assert counts[0] == 0 and counts[2] == 0
    assert counts.sum() == 5000  # exactly one class per row
    # A CDF that rounds to just under 1 must still give a valid class (the last).
    assert torch.equal(sample_probs(torch.tensor([[0.3, 0.3, 0.3999999]])).sum(), torch.tensor(1.0))


def test_small_softmax_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(64, 32, 4) * 10).requires_grad_()
    weights = torch.randn(64, 32, 4)
    ours = softmax_small(logits)
    ref = torch.softmax(logits, -1)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)
    torch.testing.assert_close(log_softmax_small(logits), torch.log_softmax(logits, -1))
    # Large logits do not overflow (the max is subtracted).
    big = torch.tensor([[1000.0, 999.0]])
    torch.testing.assert_close(softmax_small(big), torch.softmax(big, -1))


def test_mode_onehot():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert torch.equal(mode_onehot(logits), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------- KL / entropy


def test_categorical_kl_hand_value():
    # KL([.5,.5] || [.25,.75]) = .5 ln2 + .5 ln(2/3) = .5 ln(4/3)
    logp = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    logq = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert categorical_kl(logp, logq).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    # and the other direction: .25 ln(.5) + .75 ln(1.5)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert categorical_kl(logq, logp).item() == pytest.approx(expected, abs=1e-12)


def test_categorical_kl_self_is_zero_and_matches_torch():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(10, 4), -1)
    logq = torch.log_softmax(torch.randn(10, 4), -1)
    torch.testing.assert_close(categorical_kl(logp, logp), torch.zeros(10))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logp), torch.distributions.Categorical(logits=logq)
    )
    torch.testing.assert_close(categorical_kl(logp, logq), ref)


def test_categorical_entropy():
    for c in (2, 4, 7):
        uniform = torch.full((c,), -math.log(c))
        assert categorical_entropy(uniform).item() == pytest.approx(math.log(c), abs=1e-6)
    logp = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert categorical_entropy(logp).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


# --------------------------------------------------------------------------- bounded normal


def test_bounded_normal_hand_values():
    x = torch.tensor([-100.0, -2.0, 0.0, 100.0], dtype=torch.float64)
    mean, std = bounded_normal(x, x)
    torch.testing.assert_close(mean, torch.tanh(x))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    expected = [0.1, 0.9 * 0.5 + 0.1, 0.9 * sig(2.0) + 0.1, 1.0]
    torch.testing.assert_close(std, torch.tensor(expected, dtype=torch.float64))


def test_bounded_normal_std_range():
    torch.manual_seed(0)
    x = 10 * torch.randn(1000)
    mean, std = bounded_normal(x, x)
    assert std.min().item() >= 0.1 and std.max().item() <= 1.0
    assert mean.abs().max().item() <= 1.0


def test_actor_continuous_params_are_bounded_normal():
    torch.manual_seed(0)
    actor = Actor(8, 3, discrete=False, units=16, layers=1, outscale=1.0)
    feat = torch.randn(5, 8)
    raw_mean, raw_std = actor.out(actor.mlp(feat)).chunk(2, -1)
    mean, std = actor(feat).chunk(2, -1)
    torch.testing.assert_close(mean, torch.tanh(raw_mean))
    torch.testing.assert_close(std, 0.9 * torch.sigmoid(raw_std + 2.0) + 0.1)
    action = torch.randn(5, 3)
    ref = torch.distributions.Normal(mean, std)
    params = actor(feat)
    torch.testing.assert_close(actor.log_prob(params, action), ref.log_prob(action).sum(-1))
    torch.testing.assert_close(actor.entropy(params), ref.entropy().sum(-1))


def test_actor_discrete_is_plain_categorical():
    torch.manual_seed(0)
    actor = Actor(8, 4, discrete=True, units=16, layers=1, outscale=1.0)
    feat = torch.randn(5, 8)
    params = actor(feat)
    torch.testing.assert_close(params, torch.log_softmax(actor.out(actor.mlp(feat)), -1))
    action = F.one_hot(torch.tensor([0, 1, 2, 3, 0]), 4).float()
    ref = torch.distributions.Categorical(logits=params)
    torch.testing.assert_close(actor.log_prob(params, action), ref.log_prob(action.argmax(-1)))
    torch.testing.assert_close(actor.entropy(params), ref.entropy())


# --------------------------------------------------------------------------- normal / binary


def test_normal_log_prob_and_entropy_match_torch():
    torch.manual_seed(0)
    mean, std = torch.randn(6, 3), 0.1 + torch.rand(6, 3)
    x = torch.randn(6, 3)
    ref = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(normal_log_prob(x, mean, std), ref.log_prob(x))
    torch.testing.assert_close(normal_entropy(std), ref.entropy())


def test_binary_log_prob_soft_target():
    logit, target = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    p = 1.0 / (1.0 + math.exp(-0.7))
    expected = 0.3 * math.log(p) + 0.7 * math.log(1.0 - p)
    assert binary_log_prob(logit, target).item() == pytest.approx(expected, abs=1e-12)
    torch.manual_seed(0)
    logits, targets = 5 * torch.randn(20), torch.rand(20)
    torch.testing.assert_close(
        binary_log_prob(logits, targets),
        -F.binary_cross_entropy_with_logits(logits, targets, reduction="none"),
    )


def test_sample_unimix_classes_first_matches_sample_probs():
    from dreamer_trl.distributions import sample_unimix_classes_first, unimix_probs

    torch.manual_seed(3)
    logits = 3 * torch.randn(50, 6, 4, dtype=torch.float64)  # [N, S, C]
    torch.manual_seed(5)
    new = sample_unimix_classes_first(logits.transpose(-1, -2), 0.01)
    torch.manual_seed(5)
    old = sample_probs(unimix_probs(logits, 0.01))
    assert new.shape == (50, 6, 4)
    assert torch.equal(new, old)
    assert torch.equal(new.sum(-1), torch.ones(50, 6, dtype=torch.float64))
