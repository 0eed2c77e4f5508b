"""The learner step, shared by online training, pretraining and offline training: sample a
batch of steps [B, T+1] from replay, update the agent on it, write the fresh posteriors back
into the replay (the next sample's replay context)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from .agent import DreamerV3Agent
from .replay import StepReplay


def update_step(
    agent: DreamerV3Agent,
    replay: StepReplay,
    device: torch.device | str | None = None,
    phases: Callable | None = None,
) -> TensorDictBase:
    """One update from ``replay``: its outputs (detached, on device) without the
    posteriors, which went back into the replay. ``phases``: the trainer's timer
    (``phases("sample")`` is a context), optional."""
    timed = phases or (lambda _name: contextlib.nullcontext())
    device = device or next(agent.parameters()).device
    with timed("sample"):
        batch = replay.sample().to(device)
    with timed("update"):
        out = agent.update(batch)
    with timed("write_back"):
        replay.write_back(batch, out.get("deter"), out.get("stoch"))
    return out.exclude("deter", "stoch")
