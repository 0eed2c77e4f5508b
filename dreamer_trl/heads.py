"""Output heads on the feature [deter, flat stoch]: two-hot scalars, binary continue, actor,
and the categorical head the decoder uses for integer observations.

Shapes: N any flattened batch (leading dims are kept), K bins, A action dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .distributions import (
    binary_log_prob,
    bounded_normal,
    categorical_entropy,
    log_softmax_small,
    mode_onehot,
    normal_entropy,
    normal_log_prob,
    sample_onehot,
    unimix_logits,
)
from .functional import (
    fold_index,
    symexp,
    symlog,
    twohot_bins,
    twohot_decode,
    twohot_decode_folded,
    twohot_nll,
)
from .nets import MLP, Linear, Norm, apply_init


class TwoHotHead(nn.Module):
    """MLP → K logits over symexp-spaced bins (reward, value).

    ``bins="symexp"``: bins in raw space, targets two-hot in raw space (current
    reference). ``bins="symlog"``: bins linear in symlog space, targets symlog-ed
    (paper2023).
    """

    def __init__(
        self,
        in_dim: int,
        units: int,
        layers: int,
        num_bins: int = 255,
        outscale: float = 0.0,
        bins: str = "symexp",
        norm: Norm = "rms",
    ):
        super().__init__()
        self.mlp = MLP(in_dim, units, layers, norm)
        self.out = Linear(self.mlp.out_features, num_bins, outscale)
        self.symlog_space = bins == "symlog"
        self.register_buffer("bins", twohot_bins(num_bins, bins), persistent=False)
        self.register_buffer("fold", fold_index(num_bins), persistent=False)

    def forward(self, feat: Tensor) -> Tensor:
        """Logits [..., K]."""
        return self.out(self.mlp(feat))

    def predict(self, logits: Tensor) -> Tensor:
        """Expected value in raw units, [...]."""
        value = twohot_decode(logits, self.bins, symmetric=True)
        return symexp(value) if self.symlog_space else value

    def folded_logits(self, feat: Tensor) -> Tensor:
        """:meth:`forward`'s logits in :func:`fold_index` order, for :meth:`predict_folded`
        (the output layer's rows are gathered, not the [..., K] logits)."""
        return nn.functional.linear(
            self.mlp(feat), self.out.weight[self.fold], self.out.bias[self.fold]
        )

    def predict_folded(self, logits: Tensor) -> Tensor:
        """:meth:`predict` of :meth:`folded_logits`, [...]."""
        value = twohot_decode_folded(logits, self.bins)
        return symexp(value) if self.symlog_space else value

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Two-hot cross-entropy to ``target`` (raw units), [...]."""
        return self.nll(torch.log_softmax(logits, -1), target)

    def nll(self, logp: Tensor, target: Tensor) -> Tensor:
        """:meth:`loss` from log-probabilities, to share one log-softmax across targets."""
        target = symlog(target) if self.symlog_space else target
        return twohot_nll(logp, target, self.bins)


class BinaryHead(nn.Module):
    """MLP → one Bernoulli logit (continue flag)."""

    def __init__(
        self, in_dim: int, units: int, layers: int, outscale: float = 1.0, norm: Norm = "rms"
    ):
        super().__init__()
        self.mlp = MLP(in_dim, units, layers, norm)
        self.out = Linear(self.mlp.out_features, 1, outscale)

    def forward(self, feat: Tensor) -> Tensor:
        """Logit [...]."""
        return self.out(self.mlp(feat)).squeeze(-1)

    @staticmethod
    def loss(logit: Tensor, target: Tensor) -> Tensor:
        return -binary_log_prob(logit, target)


class CategoricalVectorHead(nn.Module):
    """Linear → one categorical per element of an integer vector [..., D]: element d has
    ``classes[d]`` outcomes; the loss is the cross-entropy summed over the elements (the
    reference decodes integer observations with a ``categorical`` output, summed over the
    shape). Targets are class indices in ``[0, classes[d])``.

    ``forward`` returns log-probabilities [..., D, Kmax] (Kmax = max classes); an element
    with fewer classes is padded with ``-inf`` logits, so its padding has probability 0
    and one log-softmax serves every element.
    """

    def __init__(self, in_dim: int, classes: Sequence[int], outscale: float = 1.0):
        super().__init__()
        classes = [int(c) for c in classes]
        if not classes or min(classes) < 1:
            raise ValueError(f"a categorical head needs >= 1 class per element, got {classes}")
        self.size, self.kmax = len(classes), max(classes)
        self.uniform = len(set(classes)) == 1
        # One output per class of every element: no parameters spent on padding.
        self.out = Linear(in_dim, sum(classes), outscale)
        if not self.uniform:
            # index[d, k] picks element d's logit k from the flat output; padding picks the
            # extra -inf column appended at position sum(classes).
            offsets = torch.tensor([0, *classes[:-1]]).cumsum(0)
            k = torch.arange(self.kmax)
            valid = k < torch.tensor(classes)[:, None]
            index = torch.where(valid, offsets[:, None] + k, sum(classes))
            self.register_buffer("index", index, persistent=False)

    def forward(self, feat: Tensor) -> Tensor:
        """Log-probabilities [..., D, Kmax] (float32)."""
        logits = self.out(feat).float()
        if self.uniform:
            logits = logits.unflatten(-1, (self.size, self.kmax))
        else:
            pad = logits.new_full((*logits.shape[:-1], 1), float("-inf"))
            logits = torch.cat([logits, pad], -1)[..., self.index]
        return torch.log_softmax(logits, -1)

    @staticmethod
    def loss(logp: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy to class indices ``target`` [..., D], summed over D, [...].

        Gathered, not multiplied with a one-hot: 0 · -inf at the padding would be NaN."""
        return -logp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    @staticmethod
    def predict(logp: Tensor) -> Tensor:
        """Most likely class index per element, [..., D] (int64)."""
        return logp.argmax(-1)


class Actor(nn.Module):
    """Policy π(a | feat): categorical over one-hot actions, or the bounded normal.

    ``forward`` returns the distribution parameters as one tensor [..., P]:
    discrete → logits [..., A]; continuous → [mean, std] [..., 2A] (mean already
    tanh-squashed, std already bounded), so callers stay on plain tensors.
    ``unimix`` mixes that much uniform into a discrete policy (the 2023 code: 0.01; the
    reference: none); ``init``: see :func:`dreamer_trl.nets.apply_init`.
    """

    def __init__(
        self,
        in_dim: int,
        action_dim: int,
        discrete: bool,
        units: int,
        layers: int = 3,
        outscale: float = 0.01,
        minstd: float = 0.1,
        maxstd: float = 1.0,
        norm: Norm = "rms",
        unimix: float = 0.0,
        init: str = "fan_in",
    ):
        super().__init__()
        self.discrete, self.action_dim = discrete, action_dim
        self.minstd, self.maxstd, self.unimix = minstd, maxstd, unimix
        self.mlp = MLP(in_dim, units, layers, norm)
        outs = action_dim if discrete else 2 * action_dim
        # Separate mean and std layers in the reference; one fused Linear is the same map.
        self.out = Linear(self.mlp.out_features, outs, outscale)
        self.out.out_parts = (outs,) if discrete else (action_dim, action_dim)
        apply_init(self, init)

    def forward(self, feat: Tensor) -> Tensor:
        x = self.out(self.mlp(feat))
        if self.discrete:
            return unimix_logits(x, self.unimix) if self.unimix else log_softmax_small(x)
        # Both maps over the whole row, then a per-column select: the same values as
        # squashing each half, but a compiled kernel then runs over contiguous rows of 2A,
        # where halves of A (6 for walker) compile to scalar loops (about 0.36 against
        # 0.1 ms per imagination step, size1m, N=1024, 1 thread on a loaded box).
        mean, std = bounded_normal(x, x, self.minstd, self.maxstd)
        is_mean = torch.arange(x.shape[-1], device=x.device) < self.action_dim
        return torch.where(is_mean, mean, std)

    def sample(self, params: Tensor) -> Tensor:
        """An action [..., A] (one-hot for discrete), without gradient."""
        if self.discrete:
            return sample_onehot(params)
        mean, std = params.chunk(2, -1)
        return (mean + std * torch.randn_like(std)).detach()

    def mode(self, params: Tensor) -> Tensor:
        if self.discrete:
            return mode_onehot(params)
        return params.chunk(2, -1)[0]

    def log_prob(self, params: Tensor, action: Tensor) -> Tensor:
        """log π(a), summed over action dims, [...]."""
        if self.discrete:
            return (params * action).sum(-1)
        mean, std = params.chunk(2, -1)
        return normal_log_prob(action, mean, std).sum(-1)

    def entropy(self, params: Tensor) -> Tensor:
        """H[π], summed over action dims, [...]."""
        if self.discrete:
            return categorical_entropy(params)
        return normal_entropy(params.chunk(2, -1)[1]).sum(-1)

    def act(self, feat: Tensor) -> Tensor:
        """feat → sampled action, for imagination (no gradient)."""
        return self.sample(self(feat))
