"""LaProp against a hand re-implementation of SPEC.md › Optimisation: AGC (clip 0.3, pmin
1e-3, per tensor) → RMS scaling (β2 0.999, eps 1e-20, bias-corrected) → momentum (β1 0.9,
bias-corrected), lr warmed up linearly from 0 over ``warmup`` updates."""

from __future__ import annotations

import copy

import pytest
import torch

from dreamer_trl.optim import LaProp


class HandLaProp:
    """Plain per-tensor loops, one line per formula, float64."""

    def __init__(self, params, lr, warmup, agc=0.3, pmin=1e-3, b1=0.9, b2=0.999, eps=1e-20):
        self.params = [p.detach().clone() for p in params]
        self.lr, self.warmup, self.agc, self.pmin = lr, warmup, agc, pmin
        self.b1, self.b2, self.eps = b1, b2, eps
        self.nu = [torch.zeros_like(p) for p in self.params]
        self.mu = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.clip_factors: list[float] = []

    def step(self, grads):
        self.t += 1
        t = self.t
        lr = self.lr * (min(1.0, (t - 1) / self.warmup) if self.warmup else 1.0)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.agc:
                upper = self.agc * max(self.pmin, p.norm().item())
                factor = 1.0 / max(1.0, g.norm().item() / upper)
                self.clip_factors.append(factor)
                g = g * factor
            self.nu[i] = self.b2 * self.nu[i] + (1 - self.b2) * g * g
            nu_hat = self.nu[i] / (1 - self.b2**t)
            u = g / (torch.sqrt(nu_hat) + self.eps)
            self.mu[i] = self.b1 * self.mu[i] + (1 - self.b1) * u
            mu_hat = self.mu[i] / (1 - self.b1**t)
            self.params[i] = p - lr * mu_hat


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)  # ‖w‖ ≈ 3.5
    b = torch.zeros(5, dtype=torch.float64)  # zero-initialised bias: pmin applies
    return [w, b]


def _grads(step: int, scale: float, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [
        scale * torch.randn(3, 4, generator=g, dtype=torch.float64),
        scale * 1e-4 * torch.randn(5, generator=g, dtype=torch.float64),
    ]


def _run(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize(
    "scales, warmup",
    [
        ([0.01, 0.02, 0.005, 0.01, 0.03, 0.01], 3),  # AGC never clips the matrix
        ([0.01, 50.0, 0.002, 10.0, 0.5, 100.0], 3),  # AGC clips on some steps only
        ([1.0, 0.1, 1.0, 0.1], 0),  # no warmup: lr from the first update
    ],
)
def test_laprop_matches_hand_formula(scales, warmup):
    lr = 1e-2
    init = _setup()
    params = [p.clone().requires_grad_(True) for p in init]
    opt = LaProp(params, lr=lr, warmup=warmup)
    hand = HandLaProp(init, lr, warmup)
    for t, s in enumerate(scales):
        grads = _grads(t, s)
        _run(opt, params, grads)
        hand.step(grads)
        for p, q in zip(params, hand.params):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    # the zero bias only ever moves by AGC-clipped steps (pmin 1e-3): it did move
    assert params[1].abs().max() > 0


def test_agc_clipping_matters():
    """The clipping case above really clips, and without AGC the result differs."""
    lr, warmup = 1e-2, 3
    scales = [0.01, 50.0, 0.002, 10.0, 0.5, 100.0]
    init = _setup()
    params = [p.clone().requires_grad_(True) for p in init]
    opt = LaProp(params, lr=lr, warmup=warmup)
    hand = HandLaProp(init, lr, warmup)
    no_agc = HandLaProp(init, lr, warmup, agc=0.0)
    for t, s in enumerate(scales):
        grads = _grads(t, s)
        _run(opt, params, grads)
        hand.step(grads)
        no_agc.step(grads)
    matrix_factors = hand.clip_factors[0::2]
    assert min(matrix_factors) < 0.01 and max(matrix_factors) == 1.0
    torch.testing.assert_close(params[0].detach(), hand.params[0], rtol=1e-10, atol=1e-12)
    assert (params[0].detach() - no_agc.params[0]).abs().max() > 1e-4


def test_agc_factor_hand_value():
    """One tensor, one step with lr 1 and no warmup: inspect the clipped first moment."""
    p = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)  # ‖p‖ = 5
    opt = LaProp([p], lr=1.0, warmup=0)
    p.grad = torch.tensor([30.0, 0.0], dtype=torch.float64)  # ‖g‖ = 30 > 0.3·5 = 1.5
    opt.step()
    nu = opt.state[p]["nu"]
    # clipped g = [1.5, 0]; ν = 0.001·g²
    torch.testing.assert_close(nu, torch.tensor([0.001 * 1.5**2, 0.0], dtype=torch.float64))
    # u = g/√(ν/(1−β2)) = [1, 0]; μ = 0.1·u; step = μ/(1−β1) = [1, 0]
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_lr_is_zero_on_first_update_and_ramps():
    p = torch.ones(4, requires_grad=True)
    opt = LaProp([p], lr=0.1, warmup=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.current_lr(opt.param_groups[0]))
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        if len(lrs) == 1:
            assert torch.equal(p.detach(), before)  # first update: lr 0
    assert lrs == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    assert opt.param_groups[0]["step"] == 6


def test_defaults_match_spec():
    opt = LaProp([torch.zeros(1, requires_grad=True)])
    group = opt.param_groups[0]
    assert group["lr"] == 4e-5 and group["warmup"] == 1000
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-20
    assert group["agc"] == 0.3 and group["pmin"] == 1e-3


def test_float32_matches_float64_reference():
    init = _setup()
    params = [p.float().clone().requires_grad_(True) for p in init]
    opt = LaProp(params, lr=1e-3, warmup=2)
    hand = HandLaProp(init, 1e-3, 2)
    for t, s in enumerate([0.01, 5.0, 0.1, 1.0]):
        grads = _grads(t, s)
        _run(opt, params, [g.float() for g in grads])
        hand.step(grads)
    for p, q in zip(params, hand.params):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    init = _setup()
    params_a = [p.clone().requires_grad_(True) for p in init]
    opt_a = LaProp(params_a, lr=1e-2, warmup=5)
    for t in range(3):
        _run(opt_a, params_a, _grads(t, 0.1 * (t + 1)))
    state = copy.deepcopy(opt_a.state_dict())
    params_b = [p.detach().clone().requires_grad_(True) for p in params_a]
    opt_b = LaProp(params_b, lr=1e-2, warmup=5)
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["step"] == 3
    for t in range(3, 7):
        grads = _grads(t, 0.3)
        _run(opt_a, params_a, grads)
        _run(opt_b, params_b, grads)
        for p, q in zip(params_a, params_b):
            assert torch.equal(p, q)
    # a fresh optimiser (no restored state) would not continue identically
    params_c = [p.detach().clone().requires_grad_(True) for p in init]
    opt_c = LaProp(params_c, lr=1e-2, warmup=5)
    for t in range(3):
        _run(opt_c, params_c, _grads(t, 0.1 * (t + 1)))
    fresh = [p.detach().clone().requires_grad_(True) for p in params_c]
    opt_fresh = LaProp(fresh, lr=1e-2, warmup=5)
    _run(opt_c, params_c, _grads(3, 0.3))
    _run(opt_fresh, fresh, _grads(3, 0.3))
    assert not torch.equal(params_c[0], fresh[0])


def test_params_without_grad_are_skipped():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = LaProp([a, b], lr=0.1, warmup=0)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert (a.detach() < 1).all()


def test_laprop_matches_torchrl_dreamerv3_optimizer():
    """Our LaProp and TorchRL's DreamerV3Optimizer implement the same reference update
    (we keep ours: it measured faster, docs/torchrl.md)."""
    from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

    torch.manual_seed(0)
    ours = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_a, opt_b = LaProp(ours, warmup=3), DreamerV3Optimizer(theirs, warmup_steps=3)
    for step in range(6):
        for a, b in zip(ours, theirs):
            grad = torch.randn_like(a) * (10.0 if step % 2 else 0.01)  # AGC clips the big ones
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flat_agc_scaling_equals_the_foreach_one():
    """The CUDA path of AGC's per-tensor scaling (one multiply over the concatenation),
    run on the CPU: the same values as the foreach path, bit for bit."""
    from dreamer_trl.optim import scale_each_flat

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in ((3, 4), (5,), (2, 2, 2), ())]
    factors = torch.rand(len(tensors), generator=g)
    want = torch._foreach_mul(tensors, list(factors.unbind()))
    got = scale_each_flat(tensors, factors)
    assert [t.shape for t in got] == [t.shape for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
