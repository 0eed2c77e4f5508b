"""The reference optimiser: AGC → RMS scaling → momentum (LaProp), linear warmup.

Per tensor: g ← g / max(1, ‖g‖ / (clip·max(pmin, ‖θ‖))) (adaptive gradient clipping);
ν ← β2·ν + (1−β2)·g², u = g / (sqrt(ν / (1−β2^t)) + ε); μ ← β1·μ + (1−β1)·u;
θ ← θ − lr_t · μ / (1−β1^t), lr_t = lr · min(1, (t−1)/warmup) (0 on the very first
update, as optax's schedule is evaluated before its counter moves).
All work is done with ``torch._foreach_*`` over the whole parameter list.

Non-finite guard: ``step`` also checks the gradients' norms (AGC computes them anyway);
where they, or the ``finite`` flag it is given, are not finite, the update's gradients count
as zeros — selected on device, no host sync — so the moments and the weights stay finite
(the weights still move by the decayed momentum, as for any zero gradient).
``last_grads_finite`` keeps the gradients' flag for the caller's guard.

Frozen tensors (no gradient: ``algo.train_<part>=false``) are not stepped at all: their
moments and weights stay bit for bit. A tensor that takes its first gradient after the
group has stepped (a part unfrozen later) has its moments bias-corrected from its own first
step (``state["start"]``, the group's updates before it), not the group's: corrected with
the group's count, its fresh ν would be read as settled and its first updates would be
~3× too large.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class LaProp(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 4e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-20,
        agc: float = 0.3,
        pmin: float = 1e-3,
        warmup: int = 1000,
    ):
        if lr < 0 or eps < 0 or agc < 0:
            raise ValueError(f"lr, eps and agc must be ≥ 0, got {lr}, {eps}, {agc}")
        defaults = dict(lr=lr, betas=betas, eps=eps, agc=agc, pmin=pmin, warmup=warmup)
        super().__init__(params, defaults)

    def _group_state(self, group: dict, params: list[Tensor]) -> tuple[list, list, list]:
        """(ν, μ, start) of each tensor; ``start``: the group's updates before its first
        (checkpoints from before it was kept: 0)."""
        for p in params:
            state = self.state[p]
            if not state:
                state["nu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["start"] = group.get("step", 0)
        states = [self.state[p] for p in params]
        starts = [s.get("start", 0) for s in states]
        return [s["nu"] for s in states], [s["mu"] for s in states], starts

    def current_lr(self, group: dict) -> float:
        done = group.get("step", 0)  # updates already applied before this one
        warmup = group["warmup"]
        return group["lr"] * (min(done, warmup) / warmup if warmup else 1.0)

    @torch.no_grad()
    def step(self, closure=None, finite: Tensor | None = None):
        """One update; with zero gradients where they or ``finite`` are not finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                work.append((group, params, grads, torch.stack(torch._foreach_norm(grads))))
        if not work:
            return loss
        norms = torch.cat([w[3] for w in work]) if len(work) > 1 else work[0][3]
        self.last_grads_finite: Tensor = torch.isfinite(norms).all()  # NaN/inf in any gradient
        ok = self.last_grads_finite if finite is None else self.last_grads_finite & finite
        for group, params, grads, gnorm in work:
            # A NaN/inf must reach neither the moments nor the weights; on a finite update
            # these selects leave their input unchanged (bit for bit).
            zero_unless(ok, grads)
            gnorm = torch.where(ok, gnorm, 0.0)  # the zeroed gradients' norms
            nu, mu, starts = self._group_state(group, params)
            if group["agc"]:
                grads = _agc(params, grads, gnorm, group["agc"], group["pmin"])
            lr = self.current_lr(group)
            group["step"] = group.get("step", 0) + 1
            for start, index in _by_start(starts):
                lists = [_pick(xs, index) for xs in (params, grads, nu, mu)]
                _moments_and_step(*lists, group["step"] - start, lr, group)
        return loss


def _by_start(starts: list[int]) -> list[tuple[int, list[int] | None]]:
    """Tensors grouped by first step: [(start, indices)], indices None for all of them
    (the usual case: every tensor started together)."""
    if all(s == starts[0] for s in starts):
        return [(starts[0], None)]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        groups.setdefault(s, []).append(i)
    return list(groups.items())


def _pick(xs: list, index: list[int] | None) -> list:
    return xs if index is None else [xs[i] for i in index]


def _moments_and_step(
    params: list[Tensor], grads: list[Tensor], nu: list, mu: list, t: int, lr: float, group: dict
) -> None:
    """RMS scaling then momentum, bias-corrected for ``t`` updates, and the weight step."""
    beta1, beta2 = group["betas"]
    torch._foreach_mul_(nu, beta2)
    torch._foreach_addcmul_(nu, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(nu, 1.0 - beta2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_lerp_(mu, torch._foreach_div(grads, denom), 1.0 - beta1)
    if lr:
        torch._foreach_add_(params, mu, alpha=-lr / (1.0 - beta1**t))


def zero_unless(ok: Tensor, tensors: list[Tensor]) -> None:
    """Zero each tensor in place unless ``ok`` (a bool 0-dim tensor on their device): a
    select queued on the device, so no host sync — how a non-finite update's gradients are
    dropped. (A multiply by 0 would not do: NaN·0 is NaN.)"""
    if not tensors:
        return
    zero = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    for x in tensors:
        torch.where(ok, x, zero, out=x)


def _agc(
    params: list[Tensor], grads: list[Tensor], gnorm: Tensor, clip: float, pmin: float
) -> list[Tensor]:
    """Adaptive gradient clipping, each tensor against its own parameter norm (``gnorm``:
    the gradients' norms [n], already computed for the finiteness check)."""
    pnorm = torch.stack(torch._foreach_norm(params))
    factor = 1.0 / torch.clamp(gnorm / (clip * torch.clamp(pnorm, min=pmin)), min=1.0)
    if grads[0].device.type == "cpu":
        return torch._foreach_mul(grads, list(factor.unbind()))
    return scale_each_flat(grads, factor)


def scale_each_flat(tensors: list[Tensor], factors: Tensor) -> list[Tensor]:
    """``tensors[i] * factors[i]`` as one multiply over their concatenation.

    On CUDA, ``_foreach_mul`` with a list of 0-d factors (shapes unlike the tensors') takes
    torch's per-tensor path, ~100 small kernels an update; this is a copy in, one multiply
    and views out, with no host sync (the repeat counts are cached on the device)."""
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    counts = _counts(sizes, flat.device)
    flat.mul_(torch.repeat_interleave(factors, counts, output_size=flat.numel()))
    return [v.view_as(t) for v, t in zip(flat.split(sizes), tensors)]


_COUNTS: dict[tuple, Tensor] = {}


def _counts(sizes: list[int], device: torch.device) -> Tensor:
    key = (tuple(sizes), str(device))
    if key not in _COUNTS:  # once per parameter layout: the copy to the device waits
        _COUNTS[key] = torch.tensor(sizes, device=device)
    return _COUNTS[key]
