"""The world model: multi-encoder, RSSM, decoder, reward and continue heads.

Observations come as a dict: vector keys (float, [..., F_k]) and image keys (uint8,
[..., C, H, W]). Shapes: B batch, T time, D deter, S×C stoch, E feature (D + S·C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .distributions import categorical_entropy, categorical_kl
from .functional import symlog
from .heads import BinaryHead, TwoHotHead
from .nets import MLP, ConvDecoder, ConvEncoder, Linear
from .rssm import RSSM


@dataclass(frozen=True)
class ObsSpace:
    """Which observation keys the agent reads: vector dims and image shapes (C, H, W)."""

    vectors: dict[str, int]
    images: dict[str, tuple[int, int, int]]

    @property
    def keys(self) -> list[str]:
        return sorted(self.vectors) + sorted(self.images)


class MultiEncoder(nn.Module):
    """obs dict → tokens [N, F]: symlog(vectors) → MLP, images → CNN, concatenated."""

    def __init__(
        self,
        space: ObsSpace,
        units: int,
        layers: int,
        depth: int,
        norm: str = "rms",
        symlog_inputs: bool = True,
    ):
        super().__init__()
        self.space, self.symlog_inputs = space, symlog_inputs
        self.vec_keys, self.img_keys = sorted(space.vectors), sorted(space.images)
        self.out_features = 0
        if self.vec_keys:
            self.mlp = MLP(sum(space.vectors.values()), units, layers, norm)
            self.out_features += units
        if self.img_keys:
            c, h, _ = _stack_images(space)
            self.cnn = ConvEncoder(c, h, depth, norm=norm)
            self.out_features += self.cnn.out_features

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        outs = []
        if self.vec_keys:
            x = torch.cat([obs[k].float() for k in self.vec_keys], -1)
            outs.append(self.mlp(symlog(x) if self.symlog_inputs else x))
        if self.img_keys:
            img = torch.cat([obs[k] for k in self.img_keys], -3)
            lead = img.shape[:-3]
            outs.append(self.cnn(img.reshape(-1, *img.shape[-3:])).view(*lead, -1))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class MultiDecoder(nn.Module):
    """feat → reconstruction losses per key: symlog-space MSE for vectors (summed over
    features), MSE on [0, 1] pixels for images (summed over C·H·W)."""

    def __init__(
        self,
        space: ObsSpace,
        deter: int,
        stoch: int,
        units: int,
        layers: int,
        depth: int,
        norm: str = "rms",
        blocks: int = 8,
    ):
        super().__init__()
        self.space, self.deter = space, deter
        self.vec_keys, self.img_keys = sorted(space.vectors), sorted(space.images)
        if self.vec_keys:
            self.mlp = MLP(deter + stoch, units, layers, norm)
            self.vec_out = Linear(units, sum(space.vectors.values()))
        if self.img_keys:
            c, h, _ = _stack_images(space)
            self.cnn = ConvDecoder(deter, stoch, c, h, depth, units, norm=norm, blocks=blocks)

    def forward(self, feat: Tensor) -> dict[str, Tensor]:
        """Predictions per key: vectors in symlog space, images in [0, 1]."""
        preds = {}
        if self.vec_keys:
            x = self.vec_out(self.mlp(feat))
            sizes = [self.space.vectors[k] for k in self.vec_keys]
            preds.update(zip(self.vec_keys, x.split(sizes, -1)))
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
    """Encoder + RSSM + decoder + reward and continue heads, with the world-model loss."""

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
        norm: str = "rms",
        num_bins: int = 255,
        bins: str = "symexp",
        free_nats: float = 1.0,
        horizon: int = 333,
        enc_layers: int = 3,
        dec_layers: int = 3,
    ):
        super().__init__()
        self.space, self.free_nats, self.horizon = space, free_nats, horizon
        self.encoder = MultiEncoder(space, units, enc_layers, depth, norm)
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
        )
        feat = self.rssm.feat_dim
        self.decoder = MultiDecoder(
            space, deter, stoch * classes, units, dec_layers, depth, norm, blocks
        )
        self.reward = TwoHotHead(feat, units, 1, num_bins, 0.0, bins, norm)
        self.cont = BinaryHead(feat, units, 1, 1.0, norm)

    def cont_target(self, terminated: Tensor) -> Tensor:
        """(1 - terminated)·(1 - 1/horizon): the continue head doubles as the discount."""
        return (1.0 - terminated.float()) * (1.0 - 1.0 / self.horizon)

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
