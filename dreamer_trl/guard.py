"""Non-finite guard: a device-side record of updates whose losses or gradients held a NaN/inf.

``record`` runs inside every update and only queues a few tiny tensor ops (no ``.item()``,
no host sync), so it does not stall an accelerator's pipeline; ``read`` copies the record to
the host — one sync — and is meant for log time and right before a checkpoint save.

The record keeps the first bad update (its index among the updates recorded, whether its
gradients were non-finite, which loss entries were) and counts all bad ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torch import Tensor


@dataclass(frozen=True)
class NonFinite:
    """What ``NonFiniteGuard.read`` found (host values)."""

    index: int  # 0-based index of the first bad update among the ``recorded`` ones
    recorded: int  # updates recorded so far
    bad: int  # how many of them were non-finite
    gradients: bool  # the first bad update's gradients were non-finite
    losses: tuple[str, ...]  # its non-finite loss entries

    def what(self) -> str:
        """``loss_rew, loss_value; gradients`` — the non-finite parts of the first bad update."""
        parts = list(self.losses) + (["gradients"] if self.gradients else [])
        return ", ".join(parts) or "nothing recorded"


class NonFiniteGuard:
    """Accumulates, on the losses' device, whether any update went non-finite."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self._count: Tensor | None = None  # updates recorded (int64, 0-dim)
        self._bad = self._first = self._flags = None  # bad count, first index (-1), its flags

    def loss_flags(self, out: TensorDictBase) -> Tensor:
        """Finiteness of each ``loss_*`` entry of a loss output: bool [L], on its device."""
        if not self.names:
            self.names = tuple(
                k for k in out.keys() if isinstance(k, str) and k.startswith("loss_")
            )
        return torch.isfinite(torch.stack([out.get(k).detach() for k in self.names]))

    def record(self, losses_ok: Tensor, grads_ok: Tensor | None = None) -> Tensor:
        """Add one update: ``losses_ok`` from :meth:`loss_flags`, ``grads_ok`` a bool 0-dim.
        Returns whether the update was finite (a bool 0-dim tensor, still on device)."""
        if self._count is None:
            self.reset(losses_ok.device)
        grads_ok = torch.ones_like(losses_ok[0]) if grads_ok is None else grads_ok
        flags = ~torch.cat([grads_ok.reshape(1), losses_ok])  # [gradients, *losses] not finite
        bad = flags.any()
        new = bad & (self._first < 0)
        self._first = torch.where(new, self._count, self._first)
        self._flags = torch.where(new, flags, self._flags)
        self._bad += bad
        self._count += 1
        return ~bad

    def reset(self, device: torch.device | str | None = None) -> None:
        """Forget what was recorded (keeps the loss names); the record lives on ``device``
        (default: where it was)."""
        if device is None:
            if self._count is None:
                return  # nothing recorded yet: the first ``record`` creates it
            device = self._count.device
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self._count, self._bad, self._first = zero, zero.clone(), zero - 1
        self._flags = torch.zeros(len(self.names) + 1, dtype=torch.bool, device=device)

    def read(self) -> NonFinite | None:
        """The first non-finite update recorded, or None; one device→host copy."""
        if self._count is None:
            return None
        host = torch.cat([torch.stack([self._count, self._bad, self._first]), self._flags.long()])
        count, bad, first, grads, *losses = host.tolist()
        if first < 0:
            return None
        names = tuple(n for n, flag in zip(self.names, losses) if flag)
        return NonFinite(first, count, bad, bool(grads), names)

    @property
    def state(self) -> tuple[Tensor, ...]:
        """The device tensors of the record (tests check where they live)."""
        return self._count, self._bad, self._first, self._flags
