"""Critic with its slow EMA copy, and the percentile return normaliser.

The actor lives in :mod:`dreamer_trl.heads` beside the other heads on the feature.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .heads import TwoHotHead


class Critic(TwoHotHead):
    """v(feat): 3-layer MLP → symexp two-hot over 255 bins, output init 0."""

    def __init__(
        self,
        in_dim: int,
        units: int,
        layers: int = 3,
        num_bins: int = 255,
        bins: str = "symexp",
        norm: str = "rms",
    ):
        super().__init__(in_dim, units, layers, num_bins, 0.0, bins, norm)


class SlowCritic(nn.Module):
    """EMA copy of a critic: θ_slow ← θ_slow + rate·(θ − θ_slow) every ``every`` updates.

    A regulariser for the critic (its predictions are a second target), not the
    bootstrap target (reference ``slowtar: False``).
    """

    def __init__(self, critic: Critic, rate: float = 0.02, every: int = 1):
        super().__init__()
        self.net = copy.deepcopy(critic).requires_grad_(False)
        self.rate, self.every = rate, every
        self.count = 0  # a host int: checking it never waits on the device

    def get_extra_state(self) -> dict:
        return {"count": self.count}

    def set_extra_state(self, state: dict) -> None:
        self.count = int(state["count"])

    def forward(self, feat: Tensor) -> Tensor:
        return self.net(feat)

    def predict(self, logits: Tensor) -> Tensor:
        return self.net.predict(logits)

    @torch.no_grad()
    def update(self, critic: Critic) -> None:
        """One EMA step towards ``critic``."""
        if self.count % self.every == 0:
            slow = list(self.net.parameters())
            torch._foreach_lerp_(slow, [p.detach() for p in critic.parameters()], self.rate)
        self.count += 1


class ReturnNormalizer(nn.Module):
    """EMA of the 5th and 95th return percentiles; scale S = max(limit, p95 − p5).

    Starts at zero, no debiasing (reference ``retnorm``). Advantages are divided by S.
    """

    def __init__(
        self, rate: float = 0.01, limit: float = 1.0, low: float = 5.0, high: float = 95.0
    ):
        super().__init__()
        self.rate, self.limit = rate, limit
        self.register_buffer("quantiles", torch.tensor([low / 100.0, high / 100.0]))
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: Tensor) -> None:
        lo, hi = torch.quantile(returns.detach().float().flatten(), self.quantiles)
        self.lo.lerp_(lo, self.rate)
        self.hi.lerp_(hi, self.rate)

    def scale(self) -> Tensor:
        return torch.clamp(self.hi - self.lo, min=self.limit)

    def forward(self, returns: Tensor, update: bool = True) -> Tensor:
        """Update the statistics with ``returns`` (if asked), then return S."""
        if update:
            self.update(returns)
        return self.scale()
