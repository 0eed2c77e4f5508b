"""The world model: multi-encoder, RSSM, decoder, reward and continue heads.

Observations come as a dict: vector keys (float, [..., F_k]), integer vector keys (int,
[..., F_k], each element one of a known number of classes) and image keys (uint8,
[..., C, H, W]). Shapes: B batch, T time, D deter, S×C stoch, E feature (D + S·C).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchrl.data import Bounded, Categorical, MultiCategorical, TensorSpec

from .distributions import categorical_entropy, categorical_kl
from .functional import symlog
from .heads import BinaryHead, CategoricalVectorHead, TwoHotHead
from .nets import (
    MLP,
    ConvDecoder,
    ConvEncoder,
    Linear,
    Norm,
    StrideConvDecoder,
    StrideConvEncoder,
    apply_init,
)
from .rssm import RSSM

CNNS = ("maxpool", "stride")  # the reference's image nets | the 2023 code's
CONTS = ("prob", "mode")  # how imagination reads the continue head (WorldModel.cont_mode)

# Most classes one element of an integer observation may have. A wider one-hot is too sparse
# to learn from; the envs give such vectors (e.g. an int32 Box over its whole range) as floats.
MAX_INT_CLASSES = 1024


@dataclass(frozen=True)
class IntVector:
    """An integer observation vector [F]: element i takes values low[i] … low[i]+classes[i]-1."""

    low: tuple[int, ...]
    classes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.low) != len(self.classes) or not self.classes:
            raise ValueError(f"IntVector needs one low per element: {self.low}, {self.classes}")

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def width(self) -> int:
        """Features of its one-hot encoding."""
        return sum(self.classes)

    @classmethod
    def from_spec(cls, spec: TensorSpec, key: str = "observation") -> IntVector:
        """From a TorchRL integer spec with event shape [F] (env batch dims dropped):
        ``Bounded`` (inclusive bounds), ``Categorical``, ``MultiCategorical`` or ``Binary``.
        Raises one line for anything else or for more than ``MAX_INT_CLASSES`` classes."""
        size = int(spec.shape[-1]) if spec.shape else 0
        if isinstance(spec, Bounded) and not spec.dtype.is_floating_point:
            low = spec.space.low.reshape(-1, size)[0].long()
            classes = spec.space.high.reshape(-1, size)[0].long() - low + 1
        elif isinstance(spec, MultiCategorical):
            nvec = spec.nvec.reshape(-1, size)[0].long()
            low, classes = torch.zeros_like(nvec), nvec
        elif isinstance(spec, Categorical):  # Binary is a Categorical with n = 2
            classes = torch.full((size,), int(spec.space.n))
            low = torch.zeros_like(classes)
        else:
            raise ValueError(
                f"integer observation {key!r} has spec {type(spec).__name__} "
                f"{tuple(spec.shape)} {spec.dtype} (no class bounds); supported: float vectors "
                "[F], integer vectors [F] with a Bounded, Categorical, MultiCategorical or "
                "Binary spec, and uint8 images [C, H, W]"
            )
        if size == 0 or int(classes.max()) > MAX_INT_CLASSES or int(classes.min()) < 1:
            raise ValueError(
                f"integer observation {key!r} has {classes.tolist()} classes per element; "
                f"supported: 1 to {MAX_INT_CLASSES} per element (give wider integers as floats)"
            )
        return cls(tuple(low.tolist()), tuple(classes.tolist()))


@dataclass(frozen=True)
class ObsSpace:
    """Which observation keys the agent reads: float vector dims, image shapes (C, H, W)
    and integer vectors (one-hot encoded, decoded with one categorical per element)."""

    vectors: dict[str, int]
    images: dict[str, tuple[int, int, int]]
    integers: dict[str, IntVector] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return sorted(self.vectors) + sorted(self.integers) + sorted(self.images)


class IntegerOneHot(nn.Module):
    """Integer vectors [..., F] → their elements' one-hots, concatenated: [..., sum(classes)]
    (the reference one-hot encodes integer observations instead of symlog-ing them)."""

    def __init__(self, space: IntVector):
        super().__init__()
        self.width = space.width
        classes = torch.tensor(space.classes)
        # Buffers, not parameters, and out of the state_dict: they follow from the env spec.
        self.register_buffer("low", torch.tensor(space.low), persistent=False)
        self.register_buffer("top", classes - 1, persistent=False)
        self.register_buffer("offset", classes.cumsum(0) - classes, persistent=False)

    def index(self, x: Tensor) -> Tensor:
        """Class index of each element, [..., F] int64. Values outside the spec's bounds are
        clamped onto them: an out-of-range index would be a device-side assert on CUDA,
        which no run survives (the reference's one_hot silently gives zeros there)."""
        return torch.clamp(x.long() - self.low, min=torch.zeros_like(self.top), max=self.top)

    def forward(self, x: Tensor) -> Tensor:
        idx = self.index(x) + self.offset
        out = torch.zeros(*x.shape[:-1], self.width, device=x.device)
        return out.scatter_(-1, idx, 1.0)


class MultiEncoder(nn.Module):
    """obs dict → tokens [N, F]: [symlog(vectors), one-hot(integers)] → MLP, images → CNN,
    concatenated. ``cnn``: ``maxpool`` (reference) | ``stride`` (the 2023 code's)."""

    def __init__(
        self,
        space: ObsSpace,
        units: int,
        layers: int,
        depth: int,
        norm: Norm = "rms",
        symlog_inputs: bool = True,
        cnn: str = "maxpool",
    ):
        super().__init__()
        self.space, self.symlog_inputs = space, symlog_inputs
        self.vec_keys, self.img_keys = sorted(space.vectors), sorted(space.images)
        self.int_keys = sorted(space.integers)
        self.onehots = nn.ModuleDict({k: IntegerOneHot(space.integers[k]) for k in self.int_keys})
        self.out_features = 0
        if self.vec_keys or self.int_keys:
            width = sum(space.vectors.values()) + sum(m.width for m in self.onehots.values())
            self.mlp = MLP(width, units, layers, norm)
            self.out_features += units
        if self.img_keys:
            c, h, _ = _stack_images(space)
            if cnn == "stride":
                self.cnn = StrideConvEncoder(c, h, depth, norm)
            else:
                self.cnn = ConvEncoder(c, h, depth, norm=norm)
            self.out_features += self.cnn.out_features

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        outs = []
        if self.vec_keys or self.int_keys:
            parts = []
            if self.vec_keys:
                x = torch.cat([obs[k].float() for k in self.vec_keys], -1)
                parts.append(symlog(x) if self.symlog_inputs else x)
            parts += [self.onehots[k](obs[k]) for k in self.int_keys]
            outs.append(self.mlp(torch.cat(parts, -1) if len(parts) > 1 else parts[0]))
        if self.img_keys:
            img = torch.cat([obs[k] for k in self.img_keys], -3)
            lead = img.shape[:-3]
            outs.append(self.cnn(img.reshape(-1, *img.shape[-3:])).view(*lead, -1))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class MultiDecoder(nn.Module):
    """feat → reconstruction losses per key: symlog-space MSE for vectors (summed over
    features), cross-entropy for integer vectors (one categorical per element, summed over
    elements), MSE on [0, 1] pixels for images (summed over C·H·W). Vectors and integers
    share one MLP, each key its own output layer, as in the reference."""

    def __init__(
        self,
        space: ObsSpace,
        deter: int,
        stoch: int,
        units: int,
        layers: int,
        depth: int,
        norm: Norm = "rms",
        blocks: int = 8,
        cnn: str = "maxpool",
        vector_units: int | None = None,
    ):
        super().__init__()
        self.space, self.deter = space, deter
        self.vec_keys, self.img_keys = sorted(space.vectors), sorted(space.images)
        self.int_keys = sorted(space.integers)
        vec_units = vector_units or units
        if self.vec_keys or self.int_keys:
            self.mlp = MLP(deter + stoch, vec_units, layers, norm)
        if self.vec_keys:
            self.vec_out = Linear(vec_units, sum(space.vectors.values()))
            self.vec_out.out_parts = tuple(space.vectors[k] for k in self.vec_keys)
        if self.int_keys:
            self.int_heads = nn.ModuleDict(
                {
                    k: CategoricalVectorHead(vec_units, space.integers[k].classes)
                    for k in self.int_keys
                }
            )
            # The targets' class indices, from the same bounds the encoder one-hots with.
            self.onehots = nn.ModuleDict(
                {k: IntegerOneHot(space.integers[k]) for k in self.int_keys}
            )
        if self.img_keys:
            c, h, _ = _stack_images(space)
            if cnn == "stride":
                self.cnn = StrideConvDecoder(deter + stoch, c, h, depth, norm)
            else:
                self.cnn = ConvDecoder(deter, stoch, c, h, depth, units, norm=norm, blocks=blocks)

    def forward(self, feat: Tensor) -> dict[str, Tensor]:
        """Predictions per key: vectors in symlog space, integers as log-probabilities
        [..., F, Kmax] over class indices (see `CategoricalVectorHead`), images in [0, 1]."""
        preds = {}
        hidden = self.mlp(feat) if self.vec_keys or self.int_keys else None
        if self.vec_keys:
            x = self.vec_out(hidden)
            sizes = [self.space.vectors[k] for k in self.vec_keys]
            preds.update(zip(self.vec_keys, x.split(sizes, -1)))
        for k in self.int_keys:
            preds[k] = self.int_heads[k](hidden)
        if self.img_keys:
            lead = feat.shape[:-1]
            flat = feat.reshape(-1, feat.shape[-1])
            img = self.cnn(flat[:, : self.deter], flat[:, self.deter :])
            img = img.view(*lead, *img.shape[1:])
            sizes = [self.space.images[k][0] for k in self.img_keys]
            preds.update(zip(self.img_keys, img.split(sizes, -3)))
        return preds

    def loss(self, feat: Tensor, obs: dict[str, Tensor]) -> Tensor:
        """Summed reconstruction loss over all keys, [...]."""
        preds = self(feat)
        total = 0.0
        for k in self.vec_keys:
            total = total + (preds[k] - symlog(obs[k].float())).square().sum(-1)
        for k in self.int_keys:
            total = total + self.int_heads[k].loss(preds[k], self.onehots[k].index(obs[k]))
        for k in self.img_keys:
            target = obs[k].float() / 255.0
            total = total + (preds[k] - target).square().sum((-3, -2, -1))
        return total


def _stack_images(space: ObsSpace) -> tuple[int, int, int]:
    shapes = [space.images[k] for k in sorted(space.images)]
    if len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"image observations must share H×W, got {shapes}")
    h, w = shapes[0][1:]
    if h != w:
        raise ValueError(f"images must be square, got {h}×{w}")
    return sum(s[0] for s in shapes), h, w


class WorldModel(nn.Module):
    """Encoder + RSSM + decoder + reward and continue heads, with the world-model loss.

    Structure options (defaults: the reference; the 2023 code's in brackets): layer counts
    ``enc_layers``/``dec_layers`` 3 [5], ``reward_layers``/``cont_layers`` 1 [2 at its
    size S], ``prior_layers`` 2 [1], ``post_layers`` 1 [1]; ``vector_units`` of the vector
    encoder/decoder MLPs, None = ``units`` [1024 at every size]; ``gru`` and ``initial``
    of the RSSM; ``cnn``; ``init`` (:func:`dreamer_trl.nets.apply_init`); ``cont``:
    ``prob`` — the continue target is (1 - terminated)·(1 - 1/horizon) and imagination
    reads the predicted probability — or [``mode``]: the target is 1 - terminated and
    imagination reads the head's mode times 1 - 1/horizon (:meth:`imagined_cont`).
    """

    def __init__(
        self,
        space: ObsSpace,
        action_dim: int,
        *,
        deter: int,
        hidden: int,
        classes: int,
        units: int,
        depth: int,
        stoch: int = 32,
        blocks: int = 8,
        unimix: float = 0.01,
        norm: Norm = "rms",
        num_bins: int = 255,
        bins: str = "symexp",
        free_nats: float = 1.0,
        horizon: int = 333,
        enc_layers: int = 3,
        dec_layers: int = 3,
        reward_layers: int = 1,
        cont_layers: int = 1,
        prior_layers: int = 2,
        post_layers: int = 1,
        vector_units: int | None = None,
        gru: str = "block",
        initial: str = "zeros",
        cnn: str = "maxpool",
        init: str = "fan_in",
        cont: str = "prob",
    ):
        super().__init__()
        if cnn not in CNNS or cont not in CONTS:
            raise ValueError(f"cnn={cnn!r}, cont={cont!r}; valid: cnn in {CNNS}, cont in {CONTS}")
        self.space, self.free_nats, self.horizon = space, free_nats, horizon
        self.cont_mode = cont == "mode"
        vec_units = vector_units or units
        self.encoder = MultiEncoder(space, vec_units, enc_layers, depth, norm, cnn=cnn)
        self.rssm = RSSM(
            action_dim,
            self.encoder.out_features,
            deter,
            hidden,
            stoch,
            classes,
            blocks,
            unimix,
            norm,
            prior_layers,
            post_layers,
            gru,
            initial,
        )
        feat = self.rssm.feat_dim
        self.decoder = MultiDecoder(
            space, deter, stoch * classes, units, dec_layers, depth, norm, blocks, cnn, vec_units
        )
        self.reward = TwoHotHead(feat, units, reward_layers, num_bins, 0.0, bins, norm)
        self.cont = BinaryHead(feat, units, cont_layers, 1.0, norm)
        apply_init(self, init)

    @property
    def discount(self) -> float:
        return 1.0 - 1.0 / self.horizon

    def cont_target(self, terminated: Tensor) -> Tensor:
        """(1 - terminated)·(1 - 1/horizon): the continue head doubles as the discount.
        ``cont="mode"``: 1 - terminated (the discount is applied in imagination)."""
        alive = 1.0 - terminated.float()
        return alive if self.cont_mode else alive * self.discount

    def imagined_cont(self, prob: Tensor, start_terminal: Tensor | None) -> Tensor:
        """``cont="mode"``: the discount × continue flag of imagined states [N, H+1] from
        the head's probabilities ``prob``: 1 where it predicts continuing (mode, no
        gradient) and, at the start state, the real flag (``start_terminal`` [N]; None:
        not terminal), as the 2023 code reads them."""
        flag = (prob > 0.5).to(prob.dtype)
        if start_terminal is not None:
            flag = torch.cat([1.0 - start_terminal.to(prob.dtype)[:, None], flag[:, 1:]], 1)
        else:
            flag = torch.cat([torch.ones_like(flag[:, :1]), flag[:, 1:]], 1)
        return self.discount * flag

    def kl_losses(self, post: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
        """dyn = KL(sg(post) || prior), rep = KL(post || sg(prior)), each summed over the
        S categoricals and clipped below at ``free_nats``. [...]."""
        dyn = categorical_kl(post.detach(), prior).sum(-1)
        rep = categorical_kl(post, prior.detach()).sum(-1)
        return dyn.clamp(min=self.free_nats), rep.clamp(min=self.free_nats)

    def step_losses(self, seq, deter: Tensor, stoch: Tensor, post: Tensor) -> dict[str, Tensor]:
        """Per-step world-model losses [B, T] on posterior states of ``seq``."""
        feat = torch.cat([deter, stoch.flatten(-2)], -1)
        prior = self.rssm.prior(deter)
        dyn, rep = self.kl_losses(post, prior)
        rew = self.reward.loss(self.reward(feat), seq.reward)
        con = self.cont.loss(self.cont(feat), self.cont_target(seq.terminated))
        rec = self.decoder.loss(feat, seq.obs)
        metrics = {
            "prior_ent": categorical_entropy(prior).sum(-1).mean().detach(),
            "post_ent": categorical_entropy(post).sum(-1).mean().detach(),
        }
        return {"rec": rec, "rew": rew, "con": con, "dyn": dyn, "rep": rep}, feat, metrics
