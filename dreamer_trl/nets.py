"""Network building blocks with the reference's layout and initialisation.

Every hidden layer is Linear (zero bias) → norm → SiLU. Weights are truncated-normal
(±2σ) scaled to unit fan-in variance; output layers multiply that by their own scale
(0.0 for reward/value heads, 0.01 for the actor, 1.0 elsewhere).
The 2023 code's variants are options: :class:`HiddenSpec` (LayerNorm eps 1e-3, no Linear
bias before a norm), :func:`apply_init` (fan-avg init) and the stride-2 image
encoder/decoder (:class:`StrideConvEncoder`, :class:`StrideConvDecoder`).
Shapes: N flattened batch, G blocks, C channels, H×W image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Standard deviation of a unit normal truncated at ±2 is 0.8796; 1.1368 ≈ 1/0.8796
# restores unit variance before the fan-in scaling (reference Initializer).
_TRUNC_STD_CORRECTION = 1.1368
_TRUNC_STD = 0.8796256610342398  # the same std, unrounded, as the 2023 code divides by it


def trunc_normal_(weight: Tensor, fan_in: int, scale: float = 1.0) -> Tensor:
    """In place: truncated normal in ±2, times 1.1368·sqrt(1/fan_in)·scale."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
        weight.mul_(_TRUNC_STD_CORRECTION * math.sqrt(1.0 / fan_in) * scale)
    return weight


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose scale follows the input's dtype, so bf16 activations under
    autocast keep torch's fused kernel (a dtype mismatch falls back to an op-by-op path)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight if self.weight is None else self.weight.to(x.dtype)
        return nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)


@dataclass(frozen=True)
class HiddenSpec:
    """How every hidden layer is built. ``norm``: ``rms`` | ``layer``; ``eps`` of the norm
    (reference 1e-4, 2023 code 1e-3); ``bias``: whether the Linear before the norm has
    one (the 2023 code has none there: its LayerNorm's shift plays that part)."""

    norm: str = "rms"
    eps: float = 1e-4
    bias: bool = True


# Where a module takes ``norm``, a plain kind is HiddenSpec(kind): the reference's layers.
Norm = str | HiddenSpec


def hidden_spec(norm: Norm) -> HiddenSpec:
    return norm if isinstance(norm, HiddenSpec) else HiddenSpec(norm)


def make_norm(kind: Norm, dim: int, eps: float = 1e-4) -> nn.Module:
    """``rms`` (reference) or ``layer`` (paper2023) normalisation over the last dim; a
    :class:`HiddenSpec` brings its own eps."""
    if isinstance(kind, HiddenSpec):
        kind, eps = kind.norm, kind.eps
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm {kind!r} unknown; valid: 'rms', 'layer'")


class Linear(nn.Linear):
    """nn.Linear with the reference init: trunc-normal fan-in weights, zero bias.

    ``hidden`` (set by the layers that normalise its output) and ``out_parts`` (row
    blocks the 2023 code built as separate layers) only steer :func:`apply_init`."""

    hidden = False

    def __init__(
        self, in_features: int, out_features: int, outscale: float = 1.0, bias: bool = True
    ):
        self.outscale = outscale
        self.out_parts = (out_features,)
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, self.in_features, self.outscale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class HiddenLayer(nn.Module):
    """Linear → norm → SiLU, the reference's every hidden layer."""

    def __init__(self, in_features: int, out_features: int, norm: Norm = "rms"):
        super().__init__()
        spec = hidden_spec(norm)
        self.linear = Linear(in_features, out_features, bias=spec.bias)
        self.linear.hidden = True
        self.norm = make_norm(spec, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(self.norm(self.linear(x)))


class MLP(nn.Sequential):
    """``layers`` hidden layers of ``units`` (no output layer)."""

    def __init__(self, in_features: int, units: int, layers: int, norm: Norm = "rms"):
        sizes = [in_features] + [units] * layers
        super().__init__(*[HiddenLayer(a, b, norm) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out_features = units if layers else in_features


class BlockLinear(nn.Module):
    """Block-diagonal linear map: G independent blocks, [..., I] → [..., O].

    Block g maps input slice g (I/G features) to output slice g (O/G features). The
    weight init uses the full input size as fan-in, as the reference does.
    """

    hidden = True

    def __init__(self, in_features: int, out_features: int, blocks: int, outscale: float = 1.0):
        super().__init__()
        if in_features % blocks or out_features % blocks:
            raise ValueError(f"features {in_features}→{out_features} not divisible by {blocks}")
        self.blocks = blocks
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(blocks, in_features // blocks, out_features // blocks)
        )
        self.bias = nn.Parameter(torch.zeros(out_features))
        trunc_normal_(self.weight, in_features, outscale)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return block_matmul(x.reshape(-1, self.in_features), self.weight, self.bias).view(
            *lead, self.out_features
        )


def block_matmul(x: Tensor, weight: Tensor, bias: Tensor, base: Tensor | None = None) -> Tensor:
    """[N, G·I] @ blockdiag(weight [G, I, O]) + bias [G·O] (+ ``base`` [N, G·O]) → [N, G·O].

    Two kernels, picked by what measured faster on CPU (1 thread, G=8, I=64): one batched
    matmul over the blocks for few rows (the observe loop's B=16: 0.34 against 0.82 ms
    forward+backward) and for bf16 (imagination: 0.53 against 1.37 ms); one ``addmm`` per
    block on column slices for many float32 rows, where the batched matmul's block-major
    layout costs two transposing copies (1.47 against 0.91 ms).
    """
    g, i, o = weight.shape
    n = x.shape[0]
    add = bias if base is None else base + bias
    if n < 256 or x.dtype != torch.float32 or x.is_cuda:
        # bias (and base) enter the batched matmul as its addend: one pass fewer.
        acc = add.view(g, 1, o) if base is None else add.view(n, g, o).transpose(0, 1)
        y = torch.baddbmm(acc, x.view(n, g, i).transpose(0, 1), weight)
        return y.transpose(0, 1).reshape(n, g * o)
    outs = []
    for k in range(g):
        acc = add[..., k * o : (k + 1) * o]
        outs.append(torch.addmm(acc, x[:, k * i : (k + 1) * i], weight[k]))
    return torch.cat(outs, -1)


def tanh(x: Tensor) -> Tensor:
    """tanh(x) as 2·σ(2x) − 1: the same function (absolute error ~1e-7 in float32), but
    torch's CPU tanh, eager or compiled, is 3-4× slower than its sigmoid (size1m GRU gates:
    1.2 vs 0.3 ms per [1024, 512] imagination step)."""
    return 2.0 * torch.sigmoid(2.0 * x) - 1.0


class ChannelNorm(nn.Module):
    """Norm over the channel dim of NCHW maps (the reference normalises NHWC's last dim)."""

    def __init__(self, kind: Norm, channels: int):
        super().__init__()
        self.norm = make_norm(kind, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv(
    in_ch: int, out_ch: int, kernel: int, outscale: float = 1.0, bias: bool = True
) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding="same", bias=bias)
    trunc_normal_(conv.weight, in_ch * kernel * kernel, outscale)
    if bias:
        nn.init.zeros_(conv.bias)
    conv.hidden, conv.outscale = True, outscale  # read by apply_init
    return conv


class ConvEncoder(nn.Module):
    """Images [N, C, H, W] uint8 → tokens [N, F].

    Per stage: conv k5 s1 → 2×2 max-pool → norm → SiLU.
    """

    def __init__(
        self,
        in_channels: int,
        size: int,
        depth: int,
        mults=(2, 3, 4, 4),
        kernel: int = 5,
        norm: Norm = "rms",
    ):
        super().__init__()
        chans = [in_channels] + [depth * m for m in mults]
        bias = hidden_spec(norm).bias
        self.convs = nn.ModuleList(
            _conv(a, b, kernel, bias=bias) for a, b in zip(chans[:-1], chans[1:])
        )
        self.norms = nn.ModuleList(ChannelNorm(norm, c) for c in chans[1:])
        res = size // 2 ** len(mults)
        if not 3 <= res <= 16:
            lo, hi = 3 * 2 ** len(mults), 16 * 2 ** len(mults)
            raise ValueError(f"image size {size} gives a {res}×{res} map; use {lo}–{hi} pixels")
        self.out_features = chans[-1] * res * res

    def forward(self, img: Tensor) -> Tensor:
        x = img.float() / 255.0 - 0.5
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.silu(norm(nn.functional.max_pool2d(conv(x), 2)))
        return x.flatten(1)


class ConvDecoder(nn.Module):
    """Feature (deter, flat stoch) → images [N, C, H, W] in [0, 1].

    A block-linear spatial projection of deter plus an MLP of stoch gives the smallest
    map; each stage repeat-upsamples 2× then convolves; a sigmoid ends it.
    """

    def __init__(
        self,
        deter: int,
        stoch: int,
        out_channels: int,
        size: int,
        depth: int,
        units: int,
        mults=(2, 3, 4, 4),
        kernel: int = 5,
        blocks: int = 8,
        norm: Norm = "rms",
    ):
        super().__init__()
        chans = [depth * m for m in mults]
        self.res = size // 2 ** len(mults)
        self.blocks, self.top = blocks, chans[-1]
        flat = self.res * self.res * chans[-1]
        self.sp0 = BlockLinear(deter, flat, blocks)
        self.sp1 = HiddenLayer(stoch, 2 * units, norm)
        self.sp2 = Linear(2 * units, flat)
        self.sp2.hidden = True  # normalised with sp0's map
        self.spnorm = ChannelNorm(norm, chans[-1])
        ins, bias = chans[::-1], hidden_spec(norm).bias
        self.convs = nn.ModuleList(
            _conv(a, b, kernel, bias=bias) for a, b in zip(ins[:-1], ins[1:])
        )
        self.norms = nn.ModuleList(ChannelNorm(norm, c) for c in ins[1:])
        self.out = _conv(chans[0], out_channels, kernel)
        self.out.hidden = False

    def forward(self, deter: Tensor, stoch: Tensor) -> Tensor:
        n, r, g = deter.shape[0], self.res, self.blocks
        # Block g of the projection owns channels g·C/G…(g+1)·C/G at every position.
        x0 = self.sp0(deter).view(n, g, r, r, self.top // g).permute(0, 1, 4, 2, 3)
        x0 = x0.reshape(n, self.top, r, r)
        x1 = self.sp2(self.sp1(stoch)).view(n, r, r, self.top).permute(0, 3, 1, 2)
        x = nn.functional.silu(self.spnorm(x0 + x1))
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.silu(norm(conv(_upsample(x))))
        return torch.sigmoid(self.out(_upsample(x)))


def _upsample(x: Tensor) -> Tensor:
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2)


# --------------------------------------------------------------------------- 2023 code


def _stride_stages(size: int, minres: int) -> int:
    """Halvings from ``size`` down to ``minres`` (the 2023 code's ``log2(size/minres)``)."""
    stages = int(round(math.log2(size / minres))) if size >= minres else 0
    if stages < 1 or minres * 2**stages != size:
        raise ValueError(
            f"image size {size} is no {minres}·2^k; the stride-2 CNN (algo.cnn=stride) "
            f"needs one of {', '.join(str(minres * 2**k) for k in range(1, 7))}"
        )
    return stages


class StrideConvEncoder(nn.Module):
    """The 2023 code's image encoder: images [N, C, H, W] uint8 → tokens [N, F].

    Per stage: conv k4 stride 2 → norm → SiLU, channels depth·2^i, until the map is
    ``minres``×``minres`` (4×4: 4 stages for 64 pixels). No pooling.
    """

    def __init__(
        self, in_channels: int, size: int, depth: int, norm: Norm = "rms", minres: int = 4
    ):
        super().__init__()
        stages = _stride_stages(size, minres)
        chans = [in_channels] + [depth * 2**i for i in range(stages)]
        bias = hidden_spec(norm).bias
        self.convs = nn.ModuleList(
            _stride_conv(nn.Conv2d, a, b, bias) for a, b in zip(chans[:-1], chans[1:])
        )
        self.norms = nn.ModuleList(ChannelNorm(norm, c) for c in chans[1:])
        self.out_features = chans[-1] * minres * minres

    def forward(self, img: Tensor) -> Tensor:
        x = img.float() / 255.0 - 0.5
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.silu(norm(conv(x)))
        return x.flatten(1)


class StrideConvDecoder(nn.Module):
    """The 2023 code's image decoder: feature (deter, flat stoch) → images [N, C, H, W].

    One Linear (no norm) to a ``minres``² map of depth·2^(stages-1) channels, then per
    stage a k4 stride-2 transposed conv → norm → SiLU halving the channels; the last goes
    to the image channels with neither. Output ``x + 0.5`` (no sigmoid), for MSE against
    targets in [0, 1].
    """

    def __init__(
        self,
        feat_dim: int,
        out_channels: int,
        size: int,
        depth: int,
        norm: Norm = "rms",
        minres: int = 4,
    ):
        super().__init__()
        stages = _stride_stages(size, minres)
        chans = [depth * 2 ** (stages - 1 - i) for i in range(stages)] + [out_channels]
        self.res, self.top = minres, chans[0]
        self.inp = Linear(feat_dim, minres * minres * chans[0])
        bias = hidden_spec(norm).bias
        self.convs = nn.ModuleList(
            _stride_conv(nn.ConvTranspose2d, a, b, bias) for a, b in zip(chans[:-2], chans[1:-1])
        )
        self.norms = nn.ModuleList(ChannelNorm(norm, c) for c in chans[1:-1])
        self.out = _stride_conv(nn.ConvTranspose2d, chans[-2], chans[-1], True)
        self.out.hidden = False

    def forward(self, deter: Tensor, stoch: Tensor) -> Tensor:
        x = self.inp(torch.cat([deter, stoch], -1))
        x = x.view(-1, self.top, self.res, self.res)
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.silu(norm(conv(x)))
        return self.out(x) + 0.5


def _stride_conv(kind: type, in_ch: int, out_ch: int, bias: bool) -> nn.Module:
    """k4 stride 2, padding 1: exactly halves (conv) or doubles (transposed) the map, as
    the 2023 code's 'SAME'-padded stride-2 convs do."""
    conv = kind(in_ch, out_ch, 4, stride=2, padding=1, bias=bias)
    trunc_normal_(conv.weight, in_ch * 16)
    if bias:
        nn.init.zeros_(conv.bias)
    conv.hidden, conv.outscale = True, 1.0
    return conv


INITS = ("fan_in", "fan_avg")


def apply_init(module: nn.Module, init: str) -> nn.Module:
    """``fan_in``: keep the reference init the layers were built with. ``fan_avg``: the
    2023 code's, for every layer of ``module`` (see :func:`fan_avg_init_`)."""
    if init not in INITS:
        raise ValueError(f"init {init!r} unknown; valid: {', '.join(INITS)}")
    return fan_avg_init_(module) if init == "fan_avg" else module


def fan_avg_init_(module: nn.Module) -> nn.Module:
    """In place, the 2023 code's init (its ``Initializer`` with ``fan: avg``): layers
    followed by a norm (``hidden``) get truncated-normal ±2 weights of variance
    1/fan_avg (its ``winit: normal``); output layers, which it built without the layer
    options and so with ``winit: uniform``, get uniform weights of variance
    outscale/fan_avg (zeros for outscale 0). fan_avg = (fan_in + fan_out)/2, each
    counting the kernel's spatial size for convs. Biases stay zero.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                parts = getattr(m, "out_parts", (m.out_features,))
                for rows in m.weight.split(list(parts), 0):
                    _fan_avg_(rows, m.in_features, rows.shape[0], m)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                space = m.weight[0, 0].numel()
                _fan_avg_(m.weight, m.in_channels * space, m.out_channels * space, m)
            elif isinstance(m, BlockLinear):
                _fan_avg_(m.weight, m.in_features, m.out_features, m)
    return module


def _fan_avg_(weight: Tensor, fan_in: int, fan_out: int, layer: nn.Module) -> None:
    fan = (fan_in + fan_out) / 2
    scale = getattr(layer, "outscale", 1.0)
    if getattr(layer, "hidden", False):
        nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
        weight.mul_(math.sqrt(1.0 / fan) / _TRUNC_STD)
    elif scale:
        limit = math.sqrt(3.0 * scale / fan)
        nn.init.uniform_(weight, -limit, limit)
    else:
        nn.init.zeros_(weight)
