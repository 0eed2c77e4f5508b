"""Critic with its slow EMA copy, and the percentile return normaliser.

The actor lives in :mod:`dreamer_trl.heads` beside the other heads on the feature.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchrl.modules.value_norm import PercentileValueNorm

from .heads import TwoHotHead
from .nets import Norm, apply_init


class Critic(TwoHotHead):
    """v(feat): 3-layer MLP → symexp two-hot over 255 bins, output init 0.
    ``init``: see :func:`dreamer_trl.nets.apply_init`."""

    def __init__(
        self,
        in_dim: int,
        units: int,
        layers: int = 3,
        num_bins: int = 255,
        bins: str = "symexp",
        norm: Norm = "rms",
        init: str = "fan_in",
    ):
        super().__init__(in_dim, units, layers, num_bins, 0.0, bins, norm)
        apply_init(self, init)


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

    def folded_logits(self, feat: Tensor) -> Tensor:
        return self.net.folded_logits(feat)

    def predict_folded(self, logits: Tensor) -> Tensor:
        return self.net.predict_folded(logits)

    @torch.no_grad()
    def update(self, critic: Critic) -> None:
        """One EMA step towards ``critic``."""
        if self.count % self.every == 0:
            slow = list(self.net.parameters())
            torch._foreach_lerp_(slow, [p.detach() for p in critic.parameters()], self.rate)
        self.count += 1


class ReturnNormalizer(PercentileValueNorm):
    """EMA of the 5th and 95th return percentiles; scale S = max(limit, p95 − p5).

    Starts at zero, no debiasing (reference ``retnorm``). Advantages are divided by S.
    TorchRL's ``PercentileValueNorm`` does exactly this; this subclass only gives it the
    call the actor loss uses, ``S = norm(returns, update)``, and ``gather``: with
    data-parallel learners, every rank's returns, so that the percentiles (and so the
    statistics) are those of the ranks' batches together on every rank.
    """

    gather = None  # Callable[[Tensor], Tensor] | None, set by DreamerV3Agent.data_parallel

    def __init__(
        self, rate: float = 0.01, limit: float = 1.0, low: float = 5.0, high: float = 95.0
    ):
        super().__init__(shape=1, quantiles=(low / 100.0, high / 100.0), rate=rate, min_scale=limit)

    @property
    def limit(self) -> float:
        return self.min_scale

    @property
    def lo(self) -> Tensor:
        return self.low

    @property
    def hi(self) -> Tensor:
        return self.high

    def forward(self, returns: Tensor, update: bool = True) -> Tensor:
        """Update the statistics with ``returns`` (if asked), then return S (0-d)."""
        if update:
            x = returns.detach().float().reshape(-1, 1)
            self.update(x if self.gather is None else self.gather(x))
        return self.scale().reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in (("lo", "low"), ("hi", "high")):  # checkpoints before this class
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old).reshape(1)
        state_dict.pop(prefix + "quantiles", None)  # a constant those checkpoints stored
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
