"""Network blocks: reference init (trunc-normal, fan-in scaled), RMSNorm eps, block-linear
layout, conv encoder/decoder shapes (SPEC.md: World model › Every hidden layer / Inputs)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from dreamer_trl.nets import (
    MLP,
    BlockLinear,
    ConvDecoder,
    ConvEncoder,
    HiddenLayer,
    Linear,
    block_matmul,
    make_norm,
    tanh,
    trunc_normal_,
)


def _check_init_std(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    std = scale / math.sqrt(fan_in)
    measured = weight.detach().float().std().item()
    assert measured == pytest.approx(std, rel=0.03), (measured, std)
    # truncated at ±2σ of the unit normal, before the 1.1368 correction
    assert weight.abs().max().item() <= 2 * 1.1368 * std * (1 + 1e-5)
    assert abs(weight.detach().mean().item()) < 0.05 * std


# --------------------------------------------------------------------------- init


def test_linear_init_uses_fan_in():
    torch.manual_seed(0)
    layer = Linear(1024, 64)  # fan-in 1024 → σ 1/32; fan-out would give 1/8
    _check_init_std(layer.weight, 1024)
    assert torch.equal(layer.bias, torch.zeros(64))


def test_linear_outscale():
    torch.manual_seed(0)
    layer = Linear(512, 256, outscale=0.5)
    _check_init_std(layer.weight, 512, 0.5)
    zero = Linear(64, 255, outscale=0.0)
    assert torch.equal(zero.weight, torch.zeros(255, 64))
    assert torch.equal(zero.bias, torch.zeros(255))


def test_trunc_normal_scale():
    torch.manual_seed(0)
    w = trunc_normal_(torch.empty(256, 400), fan_in=400, scale=2.0)
    _check_init_std(w, 400, 2.0)


def test_block_linear_init_uses_full_input_as_fan_in():
    torch.manual_seed(0)
    layer = BlockLinear(1024, 512, blocks=8)  # per-block fan-in 128 would give σ 3× larger
    assert layer.weight.shape == (8, 128, 64)
    _check_init_std(layer.weight, 1024)
    assert torch.equal(layer.bias, torch.zeros(512))
    small = BlockLinear(64, 32, blocks=8, outscale=0.0)
    assert torch.equal(small.weight, torch.zeros_like(small.weight))


def test_conv_init_fan_in_is_channels_times_kernel():
    torch.manual_seed(0)
    enc = ConvEncoder(3, 64, depth=16)
    conv = enc.convs[1]  # 32 → 48 channels, k5: fan-in 32·25 = 800
    assert conv.weight.shape == (48, 32, 5, 5)
    _check_init_std(conv.weight, 32 * 25)
    assert torch.equal(conv.bias, torch.zeros(48))


def test_hidden_layer_init_zero_bias():
    torch.manual_seed(0)
    mlp = MLP(24, 16, 3)
    assert len(mlp) == 3 and mlp.out_features == 16
    for layer in mlp:
        assert torch.equal(layer.linear.bias, torch.zeros(16))
        assert isinstance(layer.norm, nn.RMSNorm)


# --------------------------------------------------------------------------- norm


def test_rmsnorm_eps_is_1e_4():
    norm = make_norm("rms", 8)
    assert isinstance(norm, nn.RMSNorm) and norm.eps == 1e-4
    # x = 0.01 everywhere: x / sqrt(mean(x²) + 1e-4) = 0.01 / sqrt(2e-4) ≈ 0.7071
    out = norm(torch.full((2, 8), 0.01))
    torch.testing.assert_close(out, torch.full((2, 8), 0.01 / math.sqrt(2e-4)))
    assert make_norm("layer", 8).eps == 1e-4
    with pytest.raises(ValueError, match="rms"):
        make_norm("batch", 8)


def test_hidden_layer_is_linear_rmsnorm_silu():
    torch.manual_seed(0)
    layer = HiddenLayer(6, 10)
    with torch.no_grad():
        layer.norm.weight.copy_(torch.linspace(0.5, 1.5, 10))
        layer.linear.bias.copy_(torch.randn(10))
    x = torch.randn(4, 6)
    h = x @ layer.linear.weight.T + layer.linear.bias
    h = h / torch.sqrt(h.square().mean(-1, keepdim=True) + 1e-4) * layer.norm.weight
    torch.testing.assert_close(layer(x), h * torch.sigmoid(h))


# --------------------------------------------------------------------------- block linear


def test_block_linear_equals_block_diagonal_dense():
    torch.manual_seed(0)
    layer = BlockLinear(24, 12, blocks=4)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(12))
    x = torch.randn(2, 3, 24)
    dense = torch.block_diag(*layer.weight)  # [24, 12], block g maps inputs 6g.. to outputs 3g..
    assert dense.shape == (24, 12)
    torch.testing.assert_close(layer(x), x @ dense + layer.bias)


@pytest.mark.parametrize("rows", [16, 1024])  # the batched-matmul and the per-block kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_matmul_kernels_equal_dense(rows, dtype):
    torch.manual_seed(0)
    w, b = torch.randn(4, 6, 3), torch.randn(12)
    x, base = torch.randn(rows, 24), torch.randn(rows, 12)
    expected = x @ torch.block_diag(*w) + b + base
    got = block_matmul(x.to(dtype), w.to(dtype), b.to(dtype), base.to(dtype))
    tol = {} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    torch.testing.assert_close(got.float(), expected, **tol)


def test_block_linear_rejects_indivisible_sizes():
    with pytest.raises(ValueError):
        BlockLinear(10, 8, blocks=4)


# --------------------------------------------------------------------------- conv


def test_conv_encoder_64x64_token_size():
    torch.manual_seed(0)
    enc = ConvEncoder(3, 64, depth=4)
    # 4 stages of ×½ → 4×4 map of depth·4 = 16 channels
    assert enc.out_features == 16 * 4 * 4
    img = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    out = enc(img)
    assert out.shape == (5, 256) and torch.isfinite(out).all()


def test_conv_encoder_scales_pixels():
    torch.manual_seed(0)
    enc = ConvEncoder(1, 48, depth=2)
    # x/255 − 0.5: a constant 127.5 image is all zeros → every stage gives silu(norm(bias)) = 0
    img = torch.full((1, 1, 48, 48), 127.5)
    assert torch.equal(enc(img), torch.zeros(1, enc.out_features))


def test_conv_encoder_rejects_bad_size():
    with pytest.raises(ValueError, match="image size"):
        ConvEncoder(3, 16, depth=4)
    with pytest.raises(ValueError, match="image size"):
        ConvEncoder(3, 32, depth=4)  # 2×2 map: the reference asserts 3 ≤ res ≤ 16
    assert ConvEncoder(3, 48, depth=2).out_features == 8 * 3 * 3


def test_conv_encoder_error_message_range_is_accepted():
    with pytest.raises(ValueError) as err:
        ConvEncoder(3, 16, depth=2)
    lo, hi = (int(v) for v in re.search(r"(\d+)\D(\d+) pixels", str(err.value)).groups())
    ConvEncoder(3, lo, depth=2)  # the advertised bounds must both build
    ConvEncoder(3, hi, depth=2)


def test_conv_decoder_shape_and_range():
    torch.manual_seed(0)
    dec = ConvDecoder(deter=64, stoch=32 * 4, out_channels=3, size=64, depth=4, units=16)
    deter, stoch = 3 * torch.randn(2, 64), torch.randn(2, 128)
    out = dec(deter, stoch)
    assert out.shape == (2, 3, 64, 64)
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert out.std().item() > 0


def test_tanh_via_sigmoid_matches_torch_tanh_and_its_gradient():
    x = torch.tensor([-30.0, -3.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 3.0, 30.0], dtype=torch.float64)
    x.requires_grad_(True)
    y = tanh(x)
    torch.testing.assert_close(y, torch.tanh(x), atol=1e-15, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 1 - torch.tanh(x.detach()) ** 2, atol=1e-15, rtol=0)
    # float32 over a wide range: absolute error at float32 rounding, exact odd symmetry at 0
    z = torch.linspace(-10, 10, 20001)
    assert (tanh(z) - torch.tanh(z)).abs().max() < 3e-7
    assert tanh(torch.zeros(1)).item() == 0.0
