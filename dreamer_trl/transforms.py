"""Env transform that keeps the reward that arrived with each observation.

TorchRL moves ("next", obs) to the root after each step but leaves the reward behind,
so a root row (o_t, a_t) no longer knows r_t, the reward that came with o_t. The
reference's step layout needs it (see :mod:`dreamer_trl.sequence`). No TorchRL
transform does this (RewardSum accumulates; it does not keep the last term).
"""

from __future__ import annotations

from tensordict import TensorDictBase
from torchrl.data import Composite
from torchrl.envs.transforms import Transform

INCOMING_REWARD = "reward_in"


class IncomingReward(Transform):
    """Writes ``reward_in`` = the reward of the step that led here (0 after reset)."""

    def __init__(self, reward_key: str = "reward", out_key: str = INCOMING_REWARD):
        super().__init__(in_keys=[reward_key], out_keys=[out_key])

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase):
        next_tensordict.set(self.out_keys[0], next_tensordict.get(self.in_keys[0]).clone())
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase):
        # The spec's shape already holds the env's batch dims ([N, 1] for a batched env).
        spec = self.parent.full_reward_spec[self.in_keys[0]]
        tensordict_reset.set(self.out_keys[0], spec.zero())
        return tensordict_reset

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        reward_spec = self.parent.full_reward_spec[self.in_keys[0]]
        observation_spec[self.out_keys[0]] = reward_spec.clone()
        return observation_spec
