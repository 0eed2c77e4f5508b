"""Low-precision compute for the passes over imagined states.

The reference computes in bfloat16 with float32 weights. Here the choice is per update
(``algo.imag_dtype``) and covers what dominates an update's FLOPs: the imagination rollout
and the heads over its N·(H+1) states. The world-model pass over the replay batch stays
float32 (its B=16 rows per step are dispatch-bound, not FLOP-bound).

- no-grad passes (rollout, reward, continue, slow critic) run on low-precision *copies* of
  the modules, refreshed from the float32 weights once per update;
- passes with a gradient (critic, actor on imagined states) run under ``torch.autocast``,
  so their weight gradients still land, in float32, on the trained parameters.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware. A CPU without AVX512-BF16 or
    AMX emulates them: the default update ran 6x slower there in bf16 than in float32
    (11 s vs 1.8 s, size1m, 1 thread, AVX2-only AMD EPYC; docs/results.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → ``bfloat16`` (the reference's compute dtype) where ``device`` has bf16
    units, else ``float32``; other names pass through (and are checked by Precision)."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


class Precision:
    """Owns the low-precision module copies. Not an ``nn.Module``: the copies are no part
    of the agent's parameters or state dict."""

    def __init__(self, dtype: str = "bfloat16"):
        if dtype not in DTYPES:
            raise ValueError(f"imag_dtype {dtype!r} unknown; valid: {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self._pairs: dict[int, tuple[nn.Module, nn.Module]] = {}
        self._src: list[torch.Tensor] = []  # fp32 parameters, and their copies below
        self._dst: list[torch.Tensor] = []

    @property
    def low(self) -> bool:
        return self.dtype != torch.float32

    def copy_of(self, module: nn.Module) -> nn.Module:
        """``module`` itself at float32, else its low-precision copy (made on first use)."""
        if not self.low:
            return module
        pair = self._pairs.get(id(module))
        if pair is None or pair[0] is not module:
            shadow = copy.deepcopy(module).to(self.dtype).requires_grad_(False)
            self._pairs[id(module)] = pair = (module, shadow)
            pairs = self._pairs.values()
            self._src = [a for m, _ in pairs for a in m.parameters()]
            self._dst = [b for _, c in pairs for b in c.parameters()]
        return pair[1]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current float32 parameters into every copy (buffers are constants)."""
        if self._dst:
            torch._foreach_copy_(self._dst, self._src)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if self.low else x

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Low-precision matmuls with float32 weights and gradients (no-op at float32)."""
        if not self.low:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def __deepcopy__(self, memo):
        # A deep-copied loss gets fresh copies of its own (deep-copied) modules.
        return Precision(next(k for k, v in DTYPES.items() if v == self.dtype))
