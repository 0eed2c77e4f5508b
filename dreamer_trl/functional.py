"""Pure tensor functions of DreamerV3 (SPEC.md): symlog, two-hot, λ-returns.

Shapes: B batch, T time, H imagination horizon, K bins.
"""

from __future__ import annotations

import torch
from torch import Tensor


def symlog(x: Tensor) -> Tensor:
    """sign(x) · ln(|x| + 1): identity near 0, logarithmic far out."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """Inverse of :func:`symlog`: sign(x) · (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def twohot_bins(num_bins: int = 255, variant: str = "symexp") -> Tensor:
    """Bin locations in raw (symexp) space, shape [K].

    ``symexp`` (current reference): symexp of linspace(-20, 20), built from one half and
    its mirror so the bins are exactly symmetric and a uniform prediction decodes to 0.
    ``symlog`` (paper2023): the same grid, but the head works in symlog space, so the
    bins are returned in symlog units (linspace(-20, 20)) and targets are symlog-ed.
    """
    if variant == "symlog":
        return torch.linspace(-20.0, 20.0, num_bins)
    if variant != "symexp":
        raise ValueError(f"two-hot variant {variant!r} unknown; valid: 'symexp', 'symlog'")
    if num_bins % 2 == 1:
        half = symexp(torch.linspace(-20.0, 0.0, (num_bins - 1) // 2 + 1))
        return torch.cat([half, -half[:-1].flip(0)])
    half = symexp(torch.linspace(-20.0, 0.0, num_bins // 2))
    return torch.cat([half, -half.flip(0)])


def twohot_encode(target: Tensor, bins: Tensor) -> Tensor:
    """Two-hot target [..., K]: weight split linearly between the two nearest bins.

    Values beyond the outermost bins put all weight on that bin.
    """
    num = bins.shape[0]
    below = (bins <= target.unsqueeze(-1)).sum(-1) - 1
    above = num - (bins > target.unsqueeze(-1)).sum(-1)
    below = below.clamp(0, num - 1)
    above = above.clamp(0, num - 1)
    equal = below == above
    dist_below = torch.where(equal, 1.0, (bins[below] - target).abs())
    dist_above = torch.where(equal, 1.0, (bins[above] - target).abs())
    total = dist_below + dist_above
    weight_below = (dist_above / total).unsqueeze(-1)
    weight_above = (dist_below / total).unsqueeze(-1)
    zeros = target.new_zeros((*target.shape, num))
    out = zeros.scatter_add(-1, below.unsqueeze(-1), weight_below)
    return out.scatter_add(-1, above.unsqueeze(-1), weight_above)


def twohot_decode(
    logits: Tensor, bins: Tensor, symmetric: bool | None = None, logp: bool = False
) -> Tensor:
    """Expected value Σ p_k · b_k of a two-hot head, [..., K] → [...].

    ``symmetric`` bins (b_{K-1-i} = -b_i, as :func:`twohot_bins` makes) subtract mirrored
    probabilities before weighting — the reference sums the halves symmetrically — so a
    uniform distribution decodes to exactly 0 (a left-to-right sum would not). ``None``
    checks the bins (pass the answer on hot paths). ``logp``: ``logits`` are already
    log-probabilities, so exp replaces the softmax.
    """
    probs = logits.exp() if logp else torch.softmax(logits, -1)
    num = bins.shape[0]
    if symmetric is None:
        symmetric = bool(torch.equal(bins, -bins.flip(0)))
    if symmetric:
        half = num // 2
        folded = probs[..., num - half :] - probs[..., :half].flip(-1)
        return folded @ bins[num - half :]
    return probs @ bins


def fold_index(num: int) -> Tensor:
    """Bin order [K-half-1 … 0 mirrored, then the rest] that puts each bin of the lower
    half at the position of its mirror's offset: logits gathered with it let
    :func:`twohot_decode_folded` pair mirrored probabilities as two contiguous slices."""
    half = num // 2
    return torch.cat([torch.arange(half - 1, -1, -1), torch.arange(half, num)])


def twohot_decode_folded(logits: Tensor, bins: Tensor) -> Tensor:
    """:func:`twohot_decode` of symmetric ``bins`` for logits [..., K] given in
    :func:`fold_index` order: the same mirrored differences, read without a flip.

    The normaliser is summed over the same mirrored pairs (plus the middle bin), so a
    compiled CPU kernel computes both sums in one pass over each row, without storing the
    [..., K] probabilities and reading them back (16384 imagined states × 255 bins)."""
    num, half = bins.shape[0], bins.shape[0] // 2
    shift = logits.detach().amax(-1, keepdim=True)
    upper = (logits[..., num - half :] - shift).exp()
    lower = (logits[..., :half] - shift).exp()
    middle = (logits[..., half : num - half] - shift).exp().sum(-1)  # odd K: the 0 bin
    total = (upper + lower).sum(-1) + middle
    return ((upper - lower) * bins[num - half :]).sum(-1) / total


def twohot_loss(logits: Tensor, target: Tensor, bins: Tensor) -> Tensor:
    """Cross-entropy of the two-hot encoding of ``target`` under ``logits``, [...]."""
    return twohot_nll(torch.log_softmax(logits, -1), target, bins)


def twohot_nll(logp: Tensor, target: Tensor, bins: Tensor) -> Tensor:
    """Two-hot cross-entropy from log-probabilities [..., K], without building the
    [..., K] target: the two bins around ``target`` are found by binary search and
    their log-probabilities gathered. Same weights as :func:`twohot_encode`."""
    target = target.detach()
    num = bins.shape[0]
    above = torch.searchsorted(bins, target.contiguous(), right=True)
    below = (above - 1).clamp(0, num - 1)
    above = above.clamp(0, num - 1)
    dist_below = (bins[below] - target).abs()
    dist_above = (bins[above] - target).abs()
    total = dist_below + dist_above
    # searchsorted sorts a NaN last, which would make it the top bin with a finite loss; kept
    # out of ``equal``, its weight is NaN, so the loss is NaN for the non-finite guard.
    equal = (below == above) & ~torch.isnan(target)
    weight_below = torch.where(equal, 1.0, dist_above / torch.where(equal, 1.0, total))
    logp_below = logp.gather(-1, below.unsqueeze(-1)).squeeze(-1)
    logp_above = logp.gather(-1, above.unsqueeze(-1)).squeeze(-1)
    return -(weight_below * logp_below + (1.0 - weight_below) * logp_above)


def lambda_return(
    reward: Tensor,
    live: Tensor,
    boot: Tensor,
    lam: float = 0.95,
    last: Tensor | None = None,
) -> Tensor:
    """TD(λ) returns along dim 1, the reference's form, [B, T] → [B, T-1].

    R_t = r_{t+1} + live_{t+1} · ((1 - λ_{t+1}) · v_{t+1} + λ_{t+1} · R_{t+1}) and R_{T-1}
    bootstraps from v_{T-1}. Entry t belongs to state t: ``reward`` is the reward on
    arriving there, ``live`` the discount × continue flag of reaching it, ``boot`` the
    value there. λ_t is ``lam``, or 0 where ``last`` marks the end of an episode (then
    the return at that state is its bootstrap value alone).
    """
    live = live[:, 1:]
    cont = torch.full_like(live, lam) if last is None else (1.0 - last[:, 1:].float()) * lam
    interm = reward[:, 1:] + (1 - cont) * live * boot[:, 1:]
    ret = boot[:, -1]
    rets = []
    for t in range(live.shape[1] - 1, -1, -1):
        ret = interm[:, t] + live[:, t] * cont[:, t] * ret
        rets.append(ret)
    return torch.stack(rets[::-1], 1)
