"""``torch.compile`` with the settings every compiled piece of the agent shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._inductor import list_mode_options


def compile_fn(
    fn: Callable, mode: str | None = None, options: dict | None = None, **kwargs
) -> Callable:
    """``torch.compile(fn)`` with random ops left to torch's own generator.

    Inductor's CPU code otherwise draws every random number with a scalar Philox call
    inside the fused loop: the imagination step's Gaussian action noise and categorical
    uniforms cost ~1.7 ms of its ~11 ms (size1m, N=1024, 1 thread), against ~0.1 ms for
    one ``torch.rand``. ``fallback_random`` also makes compiled sampling draw exactly the
    numbers eager code draws from the same seed. ``mode`` keeps its meaning (its inductor
    options are expanded so that ``options`` can sit beside it); ``options`` overrides.
    """
    merged = {"fallback_random": True}
    if mode not in (None, "default"):
        merged = {**list_mode_options(mode, kwargs.get("dynamic")), **merged}
    merged.update(options or {})
    return torch.compile(fn, options=merged, **kwargs)
