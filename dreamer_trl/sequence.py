"""From TorchRL transitions to the reference's step layout, and back out as sequences.

TorchRL collectors record transitions: row t holds (o_t, a_t) and under "next" the
outcome (o_{t+1}, r_{t+1}, terminated, done). The reference trains on *steps*: step t
holds o_t with the reward r_t that arrived with it, is_first/is_last/is_terminal flags,
and the action a_t taken there. Two things go wrong if transitions are used directly:
either the first observation of each episode is never a training target (when steps
are built from "next"), or the final observation and its terminal flag are lost (when
built from the root). So replay stores steps: every transition gives the step of its
root observation, and every transition that ends an episode also gives the final step
(o_{t+1}, is_last, is_terminal = terminated; truncation is not termination).

A replay slice of T+1 steps becomes a :class:`Sequence`: step 0 is the replay context
(its stored acting posterior starts the filter), steps 1..T are trained.
Shapes: B batch, T time, A action dims, D deter, S×C stoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from .transforms import INCOMING_REWARD

STEP_FLAGS = ("is_first", "is_last", "is_terminal")


@dataclass
class Sequence:
    """A training sequence in the reference layout (plain tensors)."""

    obs: dict[str, Tensor]  # [B, T, ...]
    prev_action: Tensor  # [B, T, A], the action taken at the step before
    reward: Tensor  # [B, T], reward on arriving at the step
    is_first: Tensor  # [B, T] bool
    is_last: Tensor  # [B, T] bool
    is_terminal: Tensor  # [B, T] bool
    deter: Tensor  # [B, D], context: acting posterior of step 0
    stoch: Tensor  # [B, S, C]

    @property
    def terminated(self) -> Tensor:
        return self.is_terminal


def sequence_from_steps(td: TensorDictBase, obs_keys: list[str]) -> Sequence:
    """Split a replay batch of steps [B, T+1] into context (step 0) and steps 1..T."""
    return Sequence(
        obs={k: td.get(k)[:, 1:] for k in obs_keys},
        prev_action=td.get("action")[:, :-1].float(),
        reward=td.get("reward")[:, 1:].reshape(td.shape[0], -1),
        is_first=td.get("is_first")[:, 1:].reshape(td.shape[0], -1),
        is_last=td.get("is_last")[:, 1:].reshape(td.shape[0], -1),
        is_terminal=td.get("is_terminal")[:, 1:].reshape(td.shape[0], -1),
        deter=td.get("deter")[:, 0].float(),
        stoch=td.get("stoch")[:, 0].float(),
    )


def transitions_to_steps(
    td: TensorDictBase, obs_keys: list[str], latent: bool = True
) -> TensorDictBase:
    """Collector output [F] or [N, F] (time last) → step rows [M], in time order per env.

    Rows with ("next", "done") are followed by the final step of their episode. The
    acting posterior written by the policy to ("next", "deter"/"stoch") is the latent of
    each root step; final steps were never filtered by the policy and get zeros (a
    slice can only start there right before an ``is_first`` step, which resets it).
    """
    if td.ndim == 2:
        return torch.cat([transitions_to_steps(row, obs_keys, latent) for row in td.unbind(0)])
    nxt = td.get("next")
    done = nxt.get("done").reshape(-1)
    root = _steps(
        td,
        obs_keys,
        latent,
        reward=td.get(INCOMING_REWARD),
        first=td.get("is_init"),
        last=torch.zeros_like(done),
        terminal=torch.zeros_like(done),
    )
    if not done.any():
        return root
    ends = nxt[done]
    final = _steps(
        ends,
        obs_keys,
        False,
        reward=ends.get("reward"),
        first=torch.zeros_like(done[done]),
        last=torch.ones_like(done[done]),
        terminal=ends.get("terminated"),
    )
    final.set("action", torch.zeros_like(root.get("action")[: int(done.sum())]))
    if latent:
        final.set("deter", torch.zeros_like(nxt.get("deter")[done]))
        final.set("stoch", torch.zeros_like(nxt.get("stoch")[done]))
    # Row i moves down by the number of episode ends before it; a final step sits
    # right after the row that ended its episode.
    shift = torch.cumsum(done.long(), 0)
    root_pos = torch.arange(done.numel()) + shift - done.long()
    final_pos = (torch.arange(done.numel()) + shift)[done]
    out = root.new_empty(done.numel() + int(done.sum()))
    out[root_pos] = root
    out[final_pos] = final
    return out


def _steps(src, obs_keys, latent, *, reward, first, last, terminal) -> TensorDictBase:
    n = src.shape[0]
    out = TensorDict(
        {k: src.get(k) for k in obs_keys}
        | {
            "reward": reward.reshape(n).float(),
            "is_first": first.reshape(n).bool(),
            "is_last": last.reshape(n).bool(),
            "is_terminal": terminal.reshape(n).bool(),
        },
        batch_size=[n],
    )
    if "action" in src.keys():
        out.set("action", src.get("action").float())
    if latent:
        out.set("deter", src.get(("next", "deter")))
        out.set("stoch", src.get(("next", "stoch")))
    return out
