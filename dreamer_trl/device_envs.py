"""Device-native batched envs (suite ``torchrl``): envs whose state is a tensor on a device
and which step all N copies in one call, so collection never leaves that device.

Task ``pendulum``: TorchRL's stateless ``PendulumEnv`` (the gym Pendulum-v1 dynamics in
torch), given a batch of N by ``BatchSizeTransform``, and the layout the agent reads:
``"observation"`` float32 [3] = (cos θ, sin θ, θ̇) as gym's Pendulum-v1, actions in [-1, 1]
mapped onto its torque bounds, episodes truncated after 200 steps (gym's time limit) unless
``max_episode_steps`` says otherwise. It never terminates.

Suite ``brax``: any Brax env (``task`` = its name in ``brax.envs``, e.g. ``ant``,
``inverted_pendulum``; physics in JAX, MJX for the MuJoCo-backed ones) through TorchRL's
``BraxEnv``, which keeps the N copies' state in the tensordict on ``device`` (JAX ↔ torch by
DLPack). A Brax env ends only by termination; episodes are truncated after
``BRAX_STEPS`` (Brax's training episode length) unless ``max_episode_steps`` says otherwise.
Needs the optional ``brax`` extra (``pip install -e '.[brax]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, Unbounded
from torchrl.envs import BatchSizeTransform, EnvBase, PendulumEnv, Transform

TASKS = ("pendulum",)
PENDULUM_STEPS = 200  # gym Pendulum-v1's TimeLimit
BRAX_STEPS = 1000  # brax.training's episode_length


def build(
    opts: dict[str, Any], seed: int | None, device: torch.device, batch: int | None
) -> tuple[EnvBase, list[Transform]]:
    """The base env and its transforms (before the action and episode transforms)."""
    task = opts["task"]
    if task not in TASKS:
        raise ValueError(f"unknown torchrl task {task!r}; valid tasks: {', '.join(TASKS)}")
    if opts["from_pixels"]:
        raise ValueError("from_pixels=True: suite 'torchrl' has vector observations only")
    base = PendulumEnv(device=device, seed=seed)
    transforms: list[Transform] = []
    if batch is not None:
        transforms.append(
            BatchSizeTransform(batch_size=[batch], reset_func=_Reset(batch), env_kwarg=True)
        )
    return base, [*transforms, PendulumObservation()]


def build_brax(
    opts: dict[str, Any], seed: int | None, device: torch.device, batch: int | None
) -> EnvBase:
    """TorchRL's ``BraxEnv`` for ``opts["task"]``, batch [N] (or a single env) on ``device``."""
    try:
        import brax.envs  # noqa: F401
    except ImportError:
        raise ValueError(
            "env suite 'brax' needs the brax package: pip install -e '.[brax]'"
        ) from None
    from torchrl.envs import BraxEnv

    task = opts["task"]
    if task not in BraxEnv.available_envs:
        raise ValueError(
            f"unknown brax task {task!r}; valid tasks: {', '.join(sorted(BraxEnv.available_envs))}"
        )
    if opts["from_pixels"]:
        raise ValueError("from_pixels=True: suite 'brax' has vector observations only")
    size = torch.Size([] if batch is None else [batch])
    return BraxEnv(task, batch_size=size, device=device)


class _Reset:
    """A fresh state for every env of the batch (the env keeps only the ones being reset;
    ``EnvBase`` merges by the ``_reset`` mask). A class, not a lambda: collectors pickle envs."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def __call__(self, tensordict, tensordict_reset, env: EnvBase) -> TensorDictBase:
        base = env.base_env
        params = base.gen_params(batch_size=[self.batch], device=base.device)
        return base.reset(params, set_state=False)


class PendulumObservation(Transform):
    """(θ, θ̇) → ``"observation"`` (cos θ, sin θ, θ̇) [3]: the angle as a point on the
    circle, as gym's Pendulum-v1 observes it (θ itself jumps at ±π)."""

    def __init__(self) -> None:
        super().__init__(in_keys=["th", "thdot"], out_keys=["observation"])

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        th, thdot = next_tensordict.get("th"), next_tensordict.get("thdot")
        obs = torch.stack([th.cos(), th.sin(), thdot], -1).to(torch.float32)
        return next_tensordict.set("observation", obs)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase):
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        spec = observation_spec["th"]
        observation_spec["observation"] = Unbounded(
            shape=(*spec.shape, 3), dtype=torch.float32, device=spec.device
        )
        return observation_spec


def stream_ids(first: int, n: int, device: torch.device | str = "cpu"):
    """A ``TensorDictPrimer`` default for the ``stream`` entry of a batch of ``n`` envs:
    env j is stream ``first + j``."""
    return _StreamIds(first, n, torch.device(device))


class _StreamIds:
    def __init__(self, first: int, n: int, device: torch.device) -> None:
        self.first, self.n, self.device = first, n, device

    def __call__(self, reset=None) -> torch.Tensor:
        return torch.arange(self.first, self.first + self.n, device=self.device)
