"""compile_fn: compiled random ops draw torch's own random numbers (fallback_random),
a compile mode still applies, and explicit options override the default."""

from __future__ import annotations

import torch

from dreamer_trl.compiling import compile_fn


def noisy(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x) + torch.rand_like(x) + torch.randn_like(x)


def draws(fn, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn(torch.linspace(-2, 2, 64))


def test_compiled_random_ops_draw_what_eager_draws():
    torch.testing.assert_close(draws(compile_fn(noisy, dynamic=False)), draws(noisy))


def test_mode_and_default_options_combine():
    fn = compile_fn(noisy, mode="max-autotune-no-cudagraphs", dynamic=False)
    torch.testing.assert_close(draws(fn), draws(noisy))


def test_explicit_options_override_the_default():
    # inductor's own in-kernel generator: same distribution, different numbers
    fn = compile_fn(noisy, options={"fallback_random": False}, dynamic=False)
    assert not torch.allclose(draws(fn), draws(noisy))
