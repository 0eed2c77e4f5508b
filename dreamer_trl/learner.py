"""The learner step, shared by online training, pretraining and offline training: sample a
batch of steps [B, T+1] from replay, update the agent on it, write the fresh posteriors back
into the replay (the next sample's replay context).

With a :class:`Prefetch`, the next batch is sampled (and its copy to the device started)
while the device still runs this update, before this update's write-back: one batch ahead,
as the reference's ``Prefetch`` stream (embodied/core/streams.py, amount 1) feeds its
learner. On a GPU the host's sampling then overlaps the device's update; on a CPU both run
on the same cores, so it only changes which latents the next batch sees (``auto``: off)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from .agent import DreamerV3Agent
from .replay import StepReplay

PREFETCH = ("auto", "always", "never")  # replay.prefetch


class Prefetch:
    """Holds the batch sampled one update ahead (:func:`update_step` draws and takes it)."""

    def __init__(self, replay: StepReplay, device: torch.device | str):
        self.replay, self.device = replay, device
        self.ready: TensorDictBase | None = None

    def take(self) -> TensorDictBase:
        """The batch drawn ahead, or a fresh one when none is."""
        batch, self.ready = self.ready, None
        return batch if batch is not None else self.replay.sample(self.device)

    def draw(self) -> None:
        self.ready = self.replay.sample(self.device)


def make_prefetch(
    setting: str, replay: StepReplay, device: torch.device | str
) -> Prefetch | None:
    """``replay.prefetch``: ``always``, ``never``, or ``auto`` (with a CUDA learner)."""
    if setting not in PREFETCH:
        raise ValueError(f"replay.prefetch={setting} is invalid: one of {', '.join(PREFETCH)}")
    on = setting == "always" or (setting == "auto" and torch.device(device).type == "cuda")
    return Prefetch(replay, device) if on else None


def update_step(
    agent: DreamerV3Agent,
    replay: StepReplay,
    device: torch.device | str | None = None,
    phases: Callable | None = None,
    prefetch: Prefetch | None = None,
    ahead: bool = False,
) -> TensorDictBase:
    """One update from ``replay``: its outputs (detached, on device) without the
    posteriors, which went back into the replay. ``phases``: the trainer's timer
    (``phases("sample")`` is a context), optional. ``ahead`` (with ``prefetch``): draw the
    next update's batch now — only when no extend comes before that update, so a drawn
    batch never outlives the rows its write-back will address."""
    timed = phases or (lambda _name: contextlib.nullcontext())
    device = device or next(agent.parameters()).device
    with timed("sample"):
        batch = prefetch.take() if prefetch is not None else replay.sample(device)
    with timed("update"):
        out = agent.update(batch)
    if prefetch is not None and ahead:
        with timed("sample"):
            prefetch.draw()
    with timed("write_back"):
        replay.write_back(batch, out.get("deter"), out.get("stoch"))
    return out.exclude("deter", "stoch")
