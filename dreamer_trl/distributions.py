"""The distributions of DreamerV3 as plain functions on tensors.

The RSSM and imagination loops call these many times per update, so no Python
distribution objects are built there (DESIGN.md, performance rules). Shapes: ``...``
any batch dims, S categoricals, C classes, A action dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Log-probabilities of softmax(logits) mixed with ``unimix`` uniform, [..., C]."""
    if not unimix:
        return torch.log_softmax(logits, -1)
    probs = torch.softmax(logits, -1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def sample_onehot(logits: Tensor) -> Tensor:
    """One-hot sample of a categorical, [..., C], with no gradient (Gumbel-max)."""
    with torch.no_grad():
        uniform = torch.rand_like(logits).clamp_(1e-20, 1.0)
        index = (logits - torch.log(-torch.log(uniform))).argmax(-1)
        return F.one_hot(index, logits.shape[-1]).to(logits.dtype)


def sample_onehot_st(logits: Tensor) -> Tensor:
    """One-hot sample whose gradient is that of the probabilities (straight-through)."""
    probs = torch.softmax(logits, -1)
    return sample_onehot(logits) + (probs - probs.detach())


def mode_onehot(logits: Tensor) -> Tensor:
    """The most likely class as a one-hot vector, [..., C]."""
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def categorical_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) of categoricals given log-probabilities, summed over C: [..., C] → [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def categorical_entropy(logp: Tensor) -> Tensor:
    """Entropy of a categorical given (normalised) log-probabilities, [..., C] → [...]."""
    return -(logp.exp() * logp).sum(-1)


def bounded_normal(
    mean: Tensor, std: Tensor, minstd: float = 0.1, maxstd: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Reference continuous-action head: Normal(tanh(μ), (max-min)·σ(x + 2) + min)."""
    return torch.tanh(mean), (maxstd - minstd) * torch.sigmoid(std + 2.0) + minstd


def normal_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Elementwise log N(x; mean, std), [..., A]."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


def normal_entropy(std: Tensor) -> Tensor:
    """Elementwise entropy of N(·, std), [..., A]."""
    return 0.5 * math.log(2 * math.pi * math.e) + torch.log(std)


def binary_log_prob(logit: Tensor, target: Tensor) -> Tensor:
    """log-likelihood of a (possibly soft) binary target under a Bernoulli logit."""
    return target * F.logsigmoid(logit) + (1.0 - target) * F.logsigmoid(-logit)
