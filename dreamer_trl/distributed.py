"""Data-parallel learners on ``torch.distributed`` (launched by ``torchrun``).

Each rank is a whole agent with its own collector, env streams (distinct seeds) and
replay, as the reference's replicas are; the ranks stay one agent because every update
averages their gradients (one all-reduce of the flattened gradients, see
:class:`GradientAverage`) before LaProp/AGC act on them, and the return normaliser's
percentiles are taken over every rank's returns (all-gathered, as the reference's
``Normalize._perc`` gathers over its data axes). Starting from rank 0's parameters, the
ranks then apply identical steps to identical values: their parameters, optimiser moments,
slow critic and normaliser stay bit for bit equal, and equal (to float rounding) to one
process updating on the ranks' batches concatenated.

Backends: gloo on CPU, NCCL on CUDA (one device per local rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (``local_rank`` on its host)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes the shared checkpoint state."""
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_world() -> World:
    """The world ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK);
    one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(world: World, device: torch.device, timeout_min: float = 60.0) -> torch.device:
    """Join the process group of ``world`` (gloo for CPU, NCCL for CUDA) and return this
    rank's device. A device count the job does not fit is one line (ValueError).

    ``timeout_min`` bounds a collective's wait: rank 0's evaluation runs while the others
    wait in the next update's all-reduce, so it must outlast an eval."""
    if not world.multi:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        if local_size > count:
            raise ValueError(
                f"{local_size} processes on this machine but {count} CUDA device(s): one GPU "
                f"per process; valid: NPROC <= {count}, or device=cpu"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min)
        )
    return device


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away (it
    died, or torchrun stopped it): torch's distributed errors, and gloo's socket errors,
    which reach Python as a plain RuntimeError ("Connection reset by peer")."""
    text = str(err)
    return isinstance(err, dist.DistError) or ("gloo" in text and "peer" in text)


def broadcast_module(module: nn.Module, world: World) -> None:
    """Every rank takes rank 0's parameters and buffers (the slow critic's, the return
    normaliser's included), as DDP does when it wraps a model."""
    if not world.multi:
        return
    with torch.no_grad():
        for x in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(x.data, src=0)


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; small things such as the run dir)."""
    if not world.multi:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
    if not world.multi:
        return flag
    x = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(x)  # gloo reduces CPU tensors; cheap enough for once per env batch
    return int(x) == 0


def barrier(world: World) -> None:
    if world.multi:
        dist.barrier()


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` [N, ...] concatenated along dim 0 (rank order): [size·N, ...]."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GradientAverage:
    """One all-reduce per update of every gradient (flattened into one buffer) and the
    update's loss finiteness flags: afterwards each rank holds the mean gradient and every
    rank's flags are the AND of all ranks' (so all ranks skip a non-finite update together).

    Why not ``DistributedDataParallel``: it hooks one ``forward`` call, while an update
    here runs the world model, actor and critic through many calls (the RSSM's observe
    loop, imagination, the heads); one flat all-reduce after ``backward`` is the same
    arithmetic (a mean of the ranks' gradients) without wrapping the modules. DDP would
    overlap the reduction with ``backward``; for the model sizes trained here the gradients
    are a few MB and the reduction is small next to the update (see docs/results.md)."""

    def __init__(self, params: list[nn.Parameter], world: World):
        self.params, self.size = params, world.size

    def __call__(self, losses_ok: Tensor) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        bad = (~losses_ok).to(grads[0].dtype) if grads else (~losses_ok).float()
        flat = torch.cat([g.reshape(-1) for g in grads] + [bad])
        dist.all_reduce(flat)  # sum: the mean is taken below, flags count bad ranks
        flat_grads, flat_bad = flat[: flat.numel() - bad.numel()], flat[-bad.numel() :]
        if grads:
            flat_grads.div_(self.size)
            views = flat_grads.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(views, grads)])
        return flat_bad == 0
