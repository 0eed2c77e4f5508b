"""Updates from stored experience: DreamerV3 updates from a filled StepReplay, no env.

The pieces a training loop composes for ``train.pretrain`` (N updates on a prefilled
replay before collection starts) and ``train.offline`` (updates only, from a dataset
loaded with :func:`dreamer_trl.datasets.load_dataset`):

- :func:`update_step` (from :mod:`dreamer_trl.learner`): one update as online training
  runs it: sample [B, T+1] → the agent's update → the fresh posteriors written back.
- :func:`pretrain`: ``updates`` of them, with the mean outputs every ``log_every``.
- :func:`world_model_loss`, :func:`heldout_loss`: the world-model loss of an update's
  output, and of batches the agent does not train on (held-out episodes).

Non-finite updates are recorded by the agent's guard (``agent.guard``) as in online
training; reading it is the caller's (one host sync, at log time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from .agent import DreamerV3Agent
from .learner import update_step
from .replay import StepReplay

WORLD_MODEL_LOSSES = ("loss_rec", "loss_rew", "loss_con", "loss_dyn", "loss_rep")


def pretrain(
    agent: DreamerV3Agent,
    replay: StepReplay,
    updates: int,
    *,
    device: torch.device | str | None = None,
    log_every: int = 0,
    log: Callable[[int, dict[str, float]], None] | None = None,
    phases: Callable | None = None,
) -> dict[str, float]:
    """Run ``updates`` updates from ``replay`` (filled: at least one T+1 sequence in one
    stream). Every ``log_every`` updates ``log(done, means)`` gets the interval's mean
    outputs (one host sync each); returns the means of the last interval."""
    if updates < 0:
        raise ValueError(f"updates={updates} is invalid: must be >= 0")
    if updates and not replay.can_sample():
        raise ValueError(
            f"the replay holds {len(replay)} steps, no stream of {replay.seq_len} "
            f"(train.seq_len+1): nothing to train on; valid: a replay with a sequence to sample"
        )
    device = device or _device(agent)
    sums, count, means = None, 0, {}
    for done in range(1, updates + 1):
        out = update_step(agent, replay, device, phases)
        sums = out.clone() if sums is None else sums + out  # on device: no sync per update
        count += 1
        if log is not None and log_every and done % log_every == 0:
            means, sums, count = _means(sums, count), None, 0
            log(done, means)
    return _means(sums, count) if count else means


def world_model_loss(out: TensorDictBase) -> torch.Tensor:
    """rec + rew + con + dyn + rep (scaled as trained) of a loss output."""
    return sum(out.get(k) for k in WORLD_MODEL_LOSSES)


@torch.no_grad()
def heldout_loss(
    agent: DreamerV3Agent,
    replay: StepReplay,
    batches: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean world-model losses of ``batches`` batches from ``replay`` (e.g. held-out
    episodes, a replay built with ``online=False``) without training on them or writing
    their posteriors back."""
    device = device or _device(agent)
    total = None
    for _ in range(batches):
        out = agent.loss.wm_loss(replay.sample().to(device)).select(*WORLD_MODEL_LOSSES)
        total = out if total is None else total + out
    means = _means(total, batches)
    means["world_model"] = sum(means[k] for k in WORLD_MODEL_LOSSES)
    return means


def _means(sums: TensorDictBase, count: int) -> dict[str, float]:
    return {k: float(v) / count for k, v in sums.items() if v.numel() == 1}


def _device(agent: DreamerV3Agent) -> torch.device:
    return next(agent.parameters()).device
