"""symlog/symexp, two-hot bins/encode/decode/loss and λ-returns against hand-computed values
(SPEC.md: World model › Two-hot; Actor and critic › λ-returns)."""

from __future__ import annotations

import math

import pytest
import torch

from dreamer_trl.functional import (
    lambda_return,
    symexp,
    symlog,
    twohot_bins,
    twohot_decode,
    twohot_encode,
    twohot_loss,
)

E = math.e


# --------------------------------------------------------------------------- symlog / symexp


def test_symlog_hand_values():
    x = torch.tensor([0.0, E - 1.0, -(E**2 - 1.0), 1.0, -1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0, -2.0, math.log(2.0), -math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(symlog(x), expected, rtol=0, atol=1e-12)


def test_symexp_hand_values():
    x = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([0.0, E - 1.0, -(E**2 - 1.0), E**3 - 1.0], dtype=torch.float64)
    torch.testing.assert_close(symexp(x), expected, rtol=1e-12, atol=1e-12)


def test_symexp_inverts_symlog():
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(symlog(symexp(x.clamp(-30, 30))), x.clamp(-30, 30))


def test_symlog_is_odd_and_identity_near_zero():
    x = torch.linspace(-50, 50, 101, dtype=torch.float64)
    torch.testing.assert_close(symlog(-x), -symlog(x), rtol=0, atol=0)
    small = torch.tensor([1e-6, -1e-6], dtype=torch.float64)
    torch.testing.assert_close(symlog(small), small, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- two-hot bins


def test_twohot_bins_symexp_layout():
    bins = twohot_bins(255)
    assert bins.shape == (255,)
    # exactly symmetric, middle exactly zero, endpoints ±symexp(20)
    assert torch.equal(bins, -bins.flip(0))
    assert bins[127].item() == 0.0
    end = math.exp(20.0) - 1.0
    assert bins[0].item() == pytest.approx(-end, rel=1e-6)
    assert bins[-1].item() == pytest.approx(end, rel=1e-6)
    assert bool((bins[1:] > bins[:-1]).all())
    # the grid is symexp(linspace(-20, 20, 255))
    ref = symexp(torch.linspace(-20.0, 20.0, 255, dtype=torch.float64)).float()
    torch.testing.assert_close(bins, ref, rtol=1e-5, atol=1e-6)


def test_twohot_bins_even_count_symmetric():
    bins = twohot_bins(256)
    assert bins.shape == (256,)
    assert torch.equal(bins, -bins.flip(0))
    assert bins[0].item() == pytest.approx(-(math.exp(20.0) - 1.0), rel=1e-6)


def test_twohot_bins_symlog_variant_is_linspace():
    bins = twohot_bins(255, "symlog")
    assert torch.equal(bins, torch.linspace(-20.0, 20.0, 255))


def test_twohot_bins_unknown_variant_raises():
    with pytest.raises(ValueError, match="symexp"):
        twohot_bins(255, "linear")


# --------------------------------------------------------------------------- two-hot encode

BINS4 = torch.tensor([-1.0, 0.0, 1.0, 2.0])


def test_twohot_encode_between_bins():
    enc = twohot_encode(torch.tensor(0.25), BINS4)
    torch.testing.assert_close(enc, torch.tensor([0.0, 0.75, 0.25, 0.0]))
    enc = twohot_encode(torch.tensor(-0.9), BINS4)
    torch.testing.assert_close(enc, torch.tensor([0.9, 0.1, 0.0, 0.0]))
    enc = twohot_encode(torch.tensor(1.6), BINS4)
    torch.testing.assert_close(enc, torch.tensor([0.0, 0.0, 0.4, 0.6]))


def test_twohot_encode_outside_range_goes_to_end_bin():
    enc = twohot_encode(torch.tensor([5.0, -7.0, 2.0, -1.0]), BINS4)
    expected = torch.tensor(
        [[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(enc, expected, rtol=0, atol=0)


def test_twohot_encode_exact_bin_hit_is_one_hot():
    enc = twohot_encode(torch.tensor([0.0, 1.0]), BINS4)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(enc, expected, rtol=0, atol=0)


def test_twohot_encode_batched_rows_sum_to_one_and_mean_is_target():
    bins = twohot_bins(255).double()
    target = torch.tensor([[-300.0, -2.5, 0.0], [0.01, 17.0, 4000.0]], dtype=torch.float64)
    enc = twohot_encode(target, bins)
    assert enc.shape == (2, 3, 255)
    torch.testing.assert_close(enc.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert bool(((enc > 0).sum(-1) <= 2).all())
    torch.testing.assert_close((enc * bins).sum(-1), target, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- two-hot decode


@pytest.mark.parametrize("num", [255, 256])
def test_twohot_decode_uniform_is_exactly_zero(num):
    bins = twohot_bins(num)
    logits = torch.zeros(3, num)
    out = twohot_decode(logits, bins)
    assert torch.equal(out, torch.zeros(3))


def test_twohot_decode_hand_value():
    # probs [0.1, 0.2, 0.3, 0.4] over [-1, 0, 1, 2] → -0.1 + 0 + 0.3 + 0.8 = 1.0
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert twohot_decode(logits, BINS4).item() == pytest.approx(1.0, abs=1e-6)


def test_twohot_decode_of_encoded_target_round_trips():
    bins = twohot_bins(255)
    target = torch.tensor([-5000.0, -123.4, -1.5, -0.01, 0.0, 0.3, 7.0, 1000.0])
    logits = torch.log(twohot_encode(target, bins))  # -inf off the two bins
    torch.testing.assert_close(twohot_decode(logits, bins), target, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- two-hot loss


def test_twohot_loss_is_hand_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.25, 5.0, -1.0], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([-(0.75 * logp[0, 1] + 0.25 * logp[0, 2]), -logp[1, 3], -logp[2, 0]])
    loss = twohot_loss(logits, target, BINS4.double())
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # its gradient is softmax − two-hot
    loss.sum().backward()
    enc = twohot_encode(target, BINS4.double())
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1) - enc)


def test_twohot_loss_stops_gradient_into_target():
    target = torch.tensor([0.5, 1.5], requires_grad=True)
    loss = twohot_loss(torch.zeros(2, 4, requires_grad=True), target * 1.0, BINS4)
    loss.sum().backward()
    assert target.grad is None


# --------------------------------------------------------------------------- λ-returns
# One sequence of 4 states: reward r_t arrived at state t, live_t = discount·continue of
# reaching t, boot_t = value at t. R_t = r_{t+1} + live_{t+1}((1-λ)v_{t+1} + λR_{t+1}),
# R_{T-1} = v_{T-1}.

REW = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
LIVE = torch.tensor([[1.0, 0.9, 0.8, 0.5]], dtype=torch.float64)
BOOT = torch.tensor([[10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)


def test_lambda_return_hand_example():
    # R2 = 3 + 0.5·40                          = 23
    # R1 = 2 + 0.8·(0.05·30 + 0.95·23)         = 20.68
    # R0 = 1 + 0.9·(0.05·20 + 0.95·20.68)      = 19.5814
    ret = lambda_return(REW, LIVE, BOOT, 0.95)
    assert ret.shape == (1, 3)
    torch.testing.assert_close(ret, torch.tensor([[19.5814, 20.68, 23.0]], dtype=torch.float64))


def test_lambda_return_with_last_flag():
    # state 2 ends its episode: λ_2 = 0, so the return through it is its value alone.
    # R2 = 23;  R1 = 2 + 0.8·30 = 26;  R0 = 1 + 0.9·(0.05·20 + 0.95·26) = 24.13
    last = torch.tensor([[False, False, True, False]])
    ret = lambda_return(REW, LIVE, BOOT, 0.95, last=last)
    torch.testing.assert_close(ret, torch.tensor([[24.13, 26.0, 23.0]], dtype=torch.float64))
    # a last flag on state 0 is never read (no return flows into state 0)
    last0 = torch.tensor([[True, False, False, False]])
    torch.testing.assert_close(
        lambda_return(REW, LIVE, BOOT, 0.95, last=last0), lambda_return(REW, LIVE, BOOT, 0.95)
    )


def test_lambda_return_lam1_is_monte_carlo():
    # R2 = 3 + 0.5·40 = 23; R1 = 2 + 0.8·23 = 20.4; R0 = 1 + 0.9·20.4 = 19.36
    ret = lambda_return(REW, LIVE, BOOT, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[19.36, 20.4, 23.0]], dtype=torch.float64))


def test_lambda_return_lam0_is_one_step_td():
    # R_t = r_{t+1} + live_{t+1}·v_{t+1} = [1 + 18, 2 + 24, 3 + 20]
    ret = lambda_return(REW, LIVE, BOOT, 0.0)
    torch.testing.assert_close(ret, torch.tensor([[19.0, 26.0, 23.0]], dtype=torch.float64))


def test_lambda_return_rows_are_independent():
    torch.manual_seed(0)
    rew, live, boot = torch.randn(3, 6), torch.rand(3, 6), torch.randn(3, 6)
    ret = lambda_return(rew, live, boot, 0.95)
    assert ret.shape == (3, 5)
    for b in range(3):
        one = lambda_return(rew[b : b + 1], live[b : b + 1], boot[b : b + 1], 0.95)
        torch.testing.assert_close(ret[b : b + 1], one)


# --------------------------------------------------------------------------- heads


def test_twohot_head_symexp_and_symlog_variants():
    from dreamer_trl.heads import TwoHotHead

    torch.manual_seed(0)
    logits = torch.randn(4, 255)
    target = torch.tensor([-30.0, -0.5, 2.0, 400.0])
    cur = TwoHotHead(8, 8, 1)  # current reference: raw-space bins and targets
    torch.testing.assert_close(cur.loss(logits, target), twohot_loss(logits, target, cur.bins))
    torch.testing.assert_close(cur.predict(logits), twohot_decode(logits, cur.bins))
    old = TwoHotHead(8, 8, 1, bins="symlog")  # paper2023: symlog-space bins and targets
    grid = torch.linspace(-20.0, 20.0, 255)
    torch.testing.assert_close(old.loss(logits, target), twohot_loss(logits, symlog(target), grid))
    torch.testing.assert_close(old.predict(logits), symexp(twohot_decode(logits, grid)))
    # output layer starts at zero: a fresh head predicts exactly 0
    assert torch.equal(cur.predict(cur(torch.randn(3, 8))), torch.zeros(3))


def test_twohot_decode_from_log_probs_equals_from_logits():
    torch.manual_seed(0)
    bins = twohot_bins(255, "symexp")
    logits = 3 * torch.randn(7, 255)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        twohot_decode(logp, bins, symmetric=True, logp=True),
        twohot_decode(logits, bins, symmetric=True),
    )


@pytest.mark.parametrize("num", [255, 256])
def test_fold_index_pairs_each_bin_with_its_mirror(num):
    from dreamer_trl.functional import fold_index

    bins = twohot_bins(num)
    idx = fold_index(num)
    assert sorted(idx.tolist()) == list(range(num))  # a permutation
    half = num // 2
    folded = bins[idx]
    # position i of the lower slice holds the mirror of position i of the upper slice
    assert torch.equal(folded[:half], -folded[num - half :])


@pytest.mark.parametrize("num", [255, 256])
def test_twohot_decode_folded_equals_twohot_decode(num):
    from dreamer_trl.functional import fold_index, twohot_decode_folded

    torch.manual_seed(1)
    bins = twohot_bins(num)
    logits = 3 * torch.randn(9, num, dtype=torch.float64)
    folded = twohot_decode_folded(logits[..., fold_index(num)], bins.double())
    torch.testing.assert_close(folded, twohot_decode(logits, bins.double()), rtol=1e-12, atol=1e-6)
    uniform = twohot_decode_folded(torch.zeros(3, num), bins)
    assert torch.equal(uniform, torch.zeros(3))


@pytest.mark.parametrize("bins", ["symexp", "symlog"])
def test_twohot_head_folded_prediction_equals_predict(bins):
    from dreamer_trl.heads import TwoHotHead

    torch.manual_seed(2)
    head = TwoHotHead(8, 8, 1, outscale=1.0, bins=bins).double()
    feat = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(
        head.predict_folded(head.folded_logits(feat)),
        head.predict(head(feat)),
        rtol=1e-9,
        atol=1e-6,
    )
    fresh = TwoHotHead(8, 8, 1)  # zero output layer: exactly 0 either way
    assert torch.equal(fresh.predict_folded(fresh.folded_logits(torch.randn(3, 8))), torch.zeros(3))
