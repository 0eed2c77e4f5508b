"""Environments for DreamerV3, built from TorchRL wrappers and transforms.

`make_env(cfg)` returns one TorchRL `TransformedEnv` (batch_size []) with the layout the agent
expects, whatever the suite:

- ``"observation"``: float32 [D] vector (gym Box obs flattened; DMC entries concatenated in
  sorted key order), and/or ``"pixels"``: uint8 [C, H, W] (C=3, or 1 for gray Atari).
  Integer gym observations (Discrete, MultiDiscrete, MultiBinary, a Tuple of Discrete, an
  integer or bool Box of at most ``MAX_INT_CLASSES`` values per element) stay integers:
  ``"observation"`` is then int64 [D] with a ``Bounded`` spec holding each element's
  inclusive bounds, which the agent one-hot encodes (as the reference does).
- ``"action"``: continuous → ``Bounded`` [-1, 1] float32 [A] (mapped linearly onto the true
  bounds, out-of-range values clipped first); discrete → float32 ``OneHot`` [n].
- ``"reward"`` float32 [1]; ``"terminated"``, ``"truncated"``, ``"done"`` kept apart: time limits
  are truncation, never termination. Plus ``"is_init"``, ``"step_count"``, ``"episode_reward"``.
- With ``render=True`` only: ``"render"``, uint8 [3, S, S] (S = ``render_size``), the current
  frame as a person would watch it, for eval videos. The agent never reads it.

Suites: ``gym`` (gymnasium ids), ``dmc`` (``domain-task``, e.g. ``ball_in_cup-catch``),
``atari`` (ALE game ids such as ``pong``, preprocessed the way DreamerV3's Atari100k runs are)
and ``crafter`` (task ``reward`` or ``noreward``; needs the optional ``crafter`` package).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torchrl.data import Bounded, Composite, TensorSpec
from torchrl.envs import (
    ActionScaling,
    CatTensors,
    ClipTransform,
    DMControlWrapper,
    DoubleToFloat,
    DTypeCastTransform,
    EnvBase,
    ExcludeTransform,
    FlattenObservation,
    GymWrapper,
    InitTracker,
    PermuteTransform,
    RenameTransform,
    RewardSum,
    StepCounter,
    Transform,
    TransformedEnv,
)

from . import device_envs
from .world_model import MAX_INT_CLASSES

# dm_control picks its GL backend at import time; default to headless EGL unless the user chose.
os.environ.setdefault("MUJOCO_GL", "egl")

SUITES = ("gym", "dmc", "atari", "crafter", "torchrl", "brax")
# Suites whose env steps N copies in one call on a device (make_env(batch=N)).
NATIVELY_BATCHED = ("torchrl", "brax")

DEFAULTS: dict[str, Any] = {
    "from_pixels": False,
    "image_size": 64,
    "action_repeat": 1,
    "max_episode_steps": None,
    "noop_max": 30,
    "sticky": False,
    "grayscale": False,
    "render_size": 128,
}

# DreamerV3 (and Machado et al. 2018) cap an Atari episode at 108k frames = 30 min of play.
ATARI_MAX_FRAMES = 108_000
# The reference renders quadruped from camera 2; every other DMC domain from camera 0.
DMC_CAMERAS = {"quadruped": 2}
SUPPORTED_SPACES = (
    "Box vectors, integer observations (Discrete, MultiDiscrete, MultiBinary, Tuple of "
    "Discrete, integer Box), uint8 HxWxC images, Discrete or Box actions"
)
# Widest one-hot of an integer observation (all its elements together): Atari RAM (128 bytes,
# 32768) fits; a 2-D uint8 array of 64x64 (1M) would not, and stays a float vector.
MAX_INT_WIDTH = 2**16
# Crafter's tasks, as in the reference: the achievement and health rewards, or reward 0.
CRAFTER_TASKS = ("reward", "noreward")


def make_env(
    cfg: Mapping[str, Any],
    seed: int | None = None,
    device: str | torch.device = "cpu",
    *,
    render: bool = False,
    batch: int | None = None,
    env_class: type[TransformedEnv] = TransformedEnv,
) -> TransformedEnv:
    """Build one environment described by ``cfg`` (a dict or omegaconf DictConfig).

    Fields: ``suite``, ``task`` (required); ``name``, ``from_pixels``, ``image_size``,
    ``action_repeat``, ``max_episode_steps``, ``noop_max``, ``sticky``, ``grayscale``,
    ``render_size`` (optional, see ``DEFAULTS``). ``seed`` seeds the env. ``render=True`` adds
    ``"render"`` (see the module docstring; every other key and spec is unchanged). Raises
    ``ValueError`` with one clear line for an unknown suite or task and for observation/action
    spaces the agent does not support. ``batch=N`` (suite ``torchrl`` only: its envs are
    natively batched) gives one env of batch size [N] on ``device``. ``env_class``: the
    ``TransformedEnv`` (sub)class that holds the transforms.
    """
    opts = _options(cfg)
    opts["render"] = bool(render)
    builders = {
        "gym": _build_gym,
        "dmc": _build_dmc,
        "atari": _build_atari,
        "crafter": _build_crafter,
    }
    if opts["suite"] == "torchrl":
        base, transforms = _build_torchrl(opts, seed, torch.device(device), batch)
    elif opts["suite"] == "brax":
        base, transforms = _build_brax(opts, seed, torch.device(device), batch)
    elif batch is not None:
        raise ValueError(
            f"batch={batch}: suite {opts['suite']!r} builds one env; batch envs of it with "
            "SerialEnv/ParallelEnv (collector.envs); natively batched: suites "
            f"{', '.join(NATIVELY_BATCHED)}"
        )
    else:
        base, transforms = builders[opts["suite"]](opts, seed, torch.device(device))
    env = env_class(base)
    for transform in [*transforms, *_episode_transforms(opts)]:
        env.append_transform(transform)
    if seed is not None:
        env.set_seed(seed)
    return env


def _options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Plain dict of the config with defaults filled in and the suite validated."""
    opts = {key: cfg.get(key, default) for key, default in DEFAULTS.items()}
    suite = cfg.get("suite")
    if suite not in SUITES:
        raise ValueError(f"unknown env suite {suite!r}; valid suites: {', '.join(SUITES)}")
    if not cfg.get("task"):
        raise ValueError(f"env config for suite {suite!r} needs a 'task'")
    opts.update(suite=suite, task=str(cfg["task"]), name=cfg.get("name", cfg["task"]))
    if int(opts["action_repeat"]) < 1:
        raise ValueError(f"action_repeat must be >= 1, got {opts['action_repeat']}")
    return opts


def _episode_transforms(opts: dict[str, Any]) -> list[Transform]:
    """Bookkeeping every env gets. StepCounter's limit is a truncation, never a termination."""
    return [StepCounter(max_steps=opts["max_episode_steps"]), InitTracker(), RewardSum()]


# ---------------------------------------------------------------------------------------------
# gym


def _build_gym(
    opts: dict[str, Any], seed: int | None, device: torch.device
) -> tuple[EnvBase, list[Transform]]:
    task = opts["task"]
    _check_gym_id(task)
    env = _make_gym(task, opts["render"])
    try:
        obs_kind = _check_gym_spaces(env, task)
        if obs_kind == "integer":
            env = IntegerObservation(env)
        if opts["from_pixels"] and obs_kind != "image":
            raise ValueError(
                f"from_pixels=True needs a gym env with image observations; {task!r} gives "
                f"{env.observation_space} (use suite 'dmc' for rendered control tasks)"
            )
        render = _gym_render_transforms(env, task, obs_kind, opts)
    except ValueError:
        env.close()
        raise
    base = GymWrapper(env, frame_skip=int(opts["action_repeat"]), device=device)
    if obs_kind == "image":
        obs = _image_transforms(base, opts)
    elif obs_kind == "integer":
        obs = []  # already a flat int64 vector with its bounds in the spec
    else:
        obs = _vector_transforms(env.observation_space)
    return base, [DoubleToFloat(), *obs, *render, *_action_transforms(env.action_space)]


def _make_gym(task: str, render: bool) -> gym.Env:
    if render:
        try:
            return gym.make(task, render_mode="rgb_array")
        except TypeError:  # an env whose constructor takes no render_mode
            pass
    return gym.make(task)


def _gym_render_transforms(
    env: gym.Env, task: str, obs_kind: str, opts: dict[str, Any]
) -> list[Transform]:
    """``RenderFrame`` from ``env.render()``, or from the observed image if it cannot render."""
    if not opts["render"]:
        return []
    size = int(opts["render_size"])
    if env.render_mode == "rgb_array" and "rgb_array" in env.metadata.get("render_modes", ()):
        return [RenderFrame(functools.partial(_gym_frame, env, task), size)]
    if obs_kind == "image":
        return [RenderFrame("pixels", size)]
    raise ValueError(
        f"render=True needs a gym env that renders 'rgb_array' frames or observes images; "
        f"{task!r} does neither (render modes {env.metadata.get('render_modes')})"
    )


def _gym_frame(env: gym.Env, task: str) -> np.ndarray:
    try:
        return env.render()
    except gym.error.DependencyNotInstalled as err:
        raise ValueError(f"render=True: {task!r} cannot render: {err}") from None


def _check_gym_id(task: str) -> None:
    """Raise a one-line ValueError unless ``task`` is a registered gymnasium id."""
    try:
        gym.spec(task)
        return
    except gym.error.Error:
        pass
    # Atari ids ("ALE/Pong-v5", "PongNoFrameskip-v4") exist only once ale_py registers them.
    import ale_py

    gym.register_envs(ale_py)
    try:
        gym.spec(task)
    except gym.error.Error as err:
        close = difflib.get_close_matches(task, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown gym id {task!r}: it is not registered in gymnasium "
            f"(see gymnasium.registry){hint}"
        ) from err


def _check_gym_spaces(env: gym.Env, task: str) -> str:
    """Return "vector", "integer" or "image" for the observation space; raise on unsupported
    spaces."""
    obs_space, act_space = env.observation_space, env.action_space
    if not _supported_action_space(act_space):
        raise ValueError(
            f"unsupported action space {act_space} in {task!r}; supported: {SUPPORTED_SPACES} "
            "(Box actions 1-D with finite bounds)"
        )
    if isinstance(obs_space, gym.spaces.Box) and _is_image(obs_space):
        return "image"
    if integer_bounds(obs_space) is not None:
        return "integer"
    if isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) in (1, 2):
        return "vector"
    raise ValueError(
        f"unsupported observation space {obs_space} in {task!r}; supported: {SUPPORTED_SPACES} "
        "(Box vectors 1-D or 2-D, images with C = 1 or 3, a Tuple only of Discrete spaces)"
    )


def integer_bounds(space: gym.spaces.Space) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (low, high) int64 bounds per element of the flattened observation, for a
    space the agent takes as integers; None for any other space.

    An integer Box wider than ``MAX_INT_CLASSES`` values per element (or ``MAX_INT_WIDTH`` in
    all) is None too: its one-hot would be too wide to learn from, so it stays a float vector
    (symlog inputs, MSE decoding), as integer Boxes were before integer observations.
    """
    if isinstance(space, gym.spaces.Discrete):
        low = np.array([space.start])
        return low, low + space.n - 1
    if isinstance(space, gym.spaces.MultiDiscrete):
        low = np.asarray(space.start).reshape(-1)
        return low, low + np.asarray(space.nvec).reshape(-1) - 1
    if isinstance(space, gym.spaces.MultiBinary):
        size = int(np.prod(space.n))
        return np.zeros(size, np.int64), np.ones(size, np.int64)
    if isinstance(space, gym.spaces.Tuple) and space.spaces:
        # Blackjack-v1: Tuple(Discrete(32), Discrete(11), Discrete(2)) → one vector of 3.
        if not all(isinstance(s, gym.spaces.Discrete) for s in space.spaces):
            return None
        parts = [integer_bounds(s) for s in space.spaces]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    is_int = np.issubdtype(space.dtype, np.integer) or space.dtype == np.bool_
    if isinstance(space, gym.spaces.Box) and is_int and len(space.shape) in (1, 2):
        # float64 arithmetic: an int64 Box over its whole range would overflow.
        low, high = space.low.reshape(-1), space.high.reshape(-1)
        classes = high.astype(np.float64) - low.astype(np.float64) + 1
        if classes.max() <= MAX_INT_CLASSES and classes.sum() <= MAX_INT_WIDTH:
            return low.astype(np.int64), high.astype(np.int64)
    return None


class IntegerObservation(gym.ObservationWrapper):
    """An integer observation space (see `integer_bounds`) as one flat int64 Box [D] with its
    inclusive bounds: GymWrapper then gives a ``Bounded`` int64 spec, from which the agent
    reads each element's classes. Why not GymWrapper's own mapping: it makes a Discrete
    observation a one-hot and a Tuple a stacked spec the agent cannot read."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        bounds = integer_bounds(env.observation_space)
        if bounds is None:
            raise ValueError(f"{env.observation_space} is no integer observation space")
        low, high = bounds
        self.observation_space = gym.spaces.Box(low, high, low.shape, np.int64)

    def observation(self, observation: Any) -> np.ndarray:
        return np.asarray(observation, dtype=np.int64).reshape(-1)


def _supported_action_space(space: gym.spaces.Space) -> bool:
    if isinstance(space, gym.spaces.Discrete):
        return True
    return (
        isinstance(space, gym.spaces.Box)
        and len(space.shape) == 1
        and bool(np.isfinite(space.low).all() and np.isfinite(space.high).all())
    )


def _is_image(space: gym.spaces.Box) -> bool:
    return space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] in (1, 3)


def _vector_transforms(space: gym.spaces.Box) -> list[Transform]:
    """Make a gym Box observation a 1-D float32 vector (the MLP encoder reads one vector)."""
    transforms: list[Transform] = []
    if len(space.shape) == 2:
        transforms.append(FlattenObservation(-2, -1, in_keys=["observation"]))
    # DoubleToFloat covers float64; integer (e.g. RAM bytes) and float16 vectors are cast here.
    if space.dtype not in (np.float32, np.float64):
        dtype = torch.from_numpy(np.zeros((), dtype=space.dtype)).dtype
        transforms.append(DTypeCastTransform(dtype, torch.float32, in_keys=["observation"]))
    return transforms


def _action_transforms(space: gym.spaces.Space) -> list[Transform]:
    if isinstance(space, gym.spaces.Discrete):
        # GymWrapper gives int64 one-hots; the actor emits float one-hots (straight-through).
        # in_keys=[]: with none given the cast takes every int64 observation too (integer
        # observations must stay integers).
        cast = DTypeCastTransform(
            torch.int64, torch.float32, in_keys=[], out_keys=[], in_keys_inv=["action"]
        )
        return [cast]
    return _continuous_action_transforms()


def _continuous_action_transforms() -> list[Transform]:
    """Expose [-1, 1] actions. Inverse transforms run last-to-first, so the clip runs before
    the affine map: the actor's Gaussian samples are unclipped by design (SPEC: "clipped to
    [-1, 1] only by the env wrapper")."""
    return [ActionScaling(), ClipTransform(in_keys_inv=["action"], low=-1.0, high=1.0)]


# ---------------------------------------------------------------------------------------------
# images


def _image_transforms(base: EnvBase, opts: dict[str, Any]) -> list[Transform]:
    """HxWxC uint8 under "observation" or "pixels" → "pixels" uint8 [C, size, size]."""
    transforms: list[Transform] = []
    # GymWrapper files only RGB Boxes under "pixels"; gray or odd images land in "observation".
    key = "pixels" if "pixels" in base.observation_spec.keys() else "observation"
    if key != "pixels":
        transforms.append(RenameTransform([key], ["pixels"]))
    transforms.append(PermuteTransform((-1, -3, -2), in_keys=["pixels"]))
    height, width = base.observation_spec[key].shape[-3:-1]
    size = int(opts["image_size"])
    if (height, width) != (size, size):
        transforms.append(ResizeImage(size))
    return transforms


def resize_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 [..., C, H, W] images to [..., C, size, size] (antialiased bilinear).

    On CPU torch resizes uint8 directly with PIL's BILINEAR filter (the reference resizes with
    PIL; max difference 1 level) and ~25x faster than going through float32.
    """
    lead, (channels, height, width) = images.shape[:-3], images.shape[-3:]
    if (height, width) == (size, size):
        return images
    flat = images.reshape(-1, channels, height, width)
    if flat.device.type == "cpu":
        out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True)
    else:  # accelerators have no uint8 kernel for this
        out = F.interpolate(flat.float(), size=(size, size), mode="bilinear", antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*lead, channels, size, size)


class ResizeImage(Transform):
    """Resize uint8 channel-first images with `resize_image`.

    Why not torchrl's ``Resize``: it calls torchvision, which has no CPU-only wheel here.
    """

    def __init__(self, size: int, in_keys: tuple[str, ...] = ("pixels",)) -> None:
        super().__init__(in_keys=list(in_keys), out_keys=list(in_keys))
        self.size = int(size)

    def _apply_transform(self, images: torch.Tensor) -> torch.Tensor:
        return resize_image(images, self.size)

    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        for key in self.in_keys:
            spec = observation_spec[key]
            shape = (*spec.shape[:-2], self.size, self.size)
            observation_spec[key] = _image_spec(shape, spec.device)
        return observation_spec


def _image_spec(shape: tuple[int, ...], device: torch.device | None) -> TensorSpec:
    return Bounded(low=0, high=255, shape=shape, dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------------------------------
# dm_control


def _build_dmc(
    opts: dict[str, Any], seed: int | None, device: torch.device
) -> tuple[EnvBase, list[Transform]]:
    from dm_control import suite

    domain, _, task = opts["task"].partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        valid = ", ".join(f"{d}-{t}" for d, t in suite.BENCHMARKING)
        raise ValueError(
            f"unknown dmc task {opts['task']!r} (expected 'domain-task'); benchmarking tasks: "
            f"{valid}"
        )
    if domain == "quadruped" and not hasattr(np, "in1d"):
        # dm_control 1.0.28's quadruped calls np.in1d, which numpy 2.4 removed.
        raise ValueError("dmc quadruped needs numpy<2.4 with dm_control 1.0.28 (np.in1d)")
    dm_env = suite.load(domain, task, task_kwargs={"random": seed})
    base = DMControlWrapper(dm_env, frame_skip=int(opts["action_repeat"]), device=device)
    camera = DMC_CAMERAS.get(domain, 0)
    if opts["from_pixels"]:
        state_keys = list(base.observation_spec.keys())
        pixels = RenderPixels(dm_env.physics, opts["image_size"], camera)
        obs = [pixels, ExcludeTransform(*state_keys)]
    else:
        obs = _dmc_state_transforms(base.observation_spec)
    if opts["render"]:
        obs.append(RenderPixels(dm_env.physics, opts["render_size"], camera, out_key="render"))
    # DoubleToFloat first: dm_control gives float64 observations, rewards and action bounds.
    return base, [DoubleToFloat(), *obs, *_continuous_action_transforms()]


def _dmc_state_transforms(spec: Composite) -> list[Transform]:
    """Concatenate every state entry (sorted keys) into one "observation" vector.

    Scalars already arrive as [1]; matrices (manipulator's arm_pos [8, 2]) are flattened first.
    """
    keys = sorted(spec.keys())
    flatten = [
        FlattenObservation(-len(spec[key].shape), -1, in_keys=[key])
        for key in keys
        if len(spec[key].shape) > 1
    ]
    return [*flatten, CatTensors(in_keys=keys, out_key="observation", sort=False)]


class RenderFrame(Transform):
    """Write a frame, uint8 [3, size, size], under ``out_key`` at reset and after each step.

    ``source`` is either a callable returning the current frame as an HxWxC uint8 array (a gym
    env's ``render``, ALE's ``getScreenRGB``, a dm_control ``physics.render``), or the key of a
    channel-first uint8 image already in the output (an env that cannot render is shown as the
    agent sees it). Frames are resized with `resize_image` (a no-op at the right size) and gray
    ones repeated to RGB. No other key or spec is touched.

    Why not torchrl's ``PixelRenderTransform``: to infer its spec it resets the env (one more
    reset than asked for: it shifts seeded episodes) and declares the frame ``Unbounded``.
    """

    def __init__(
        self,
        source: Callable[[], np.ndarray] | str,
        size: int,
        out_key: str = "render",
    ) -> None:
        super().__init__(in_keys=[], out_keys=[out_key])
        self.source = source
        self.size = int(size)

    def _frame(self, tensordict: TensorDictBase) -> torch.Tensor:
        if callable(self.source):
            array = self.source()
            if array is None:
                raise ValueError(f"{type(self).__name__}: the render source returned no frame")
            image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        else:
            image = tensordict.get(self.source).cpu()
        if image.shape[-3] == 1:
            image = image.expand(3, -1, -1)
        return resize_image(image, self.size).contiguous()

    def _render(self, tensordict: TensorDictBase) -> TensorDictBase:
        frame = self._frame(tensordict)
        return tensordict.set(self.out_keys[0], frame.to(tensordict.device or "cpu"))

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._render(next_tensordict)

    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        return self._render(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        shape = (3, self.size, self.size)
        observation_spec[self.out_keys[0]] = _image_spec(shape, observation_spec.device)
        return observation_spec


class RenderPixels(RenderFrame):
    """Render a dm_control physics into ``"pixels"`` (uint8 [3, H, W]) at reset and per step.

    Why not ``DMControlEnv(from_pixels=True)``: its pixel wrapper renders on every inner step of
    the action-repeat loop, and (software EGL) rendering is the dominant cost; the reference
    renders once per agent step, at the target size, as this transform does.
    """

    def __init__(
        self, physics: Any, size: int, camera_id: int = 0, out_key: str = "pixels"
    ) -> None:
        size, camera_id = int(size), int(camera_id)
        render = functools.partial(physics.render, size, size, camera_id=camera_id)
        super().__init__(render, size, out_key)
        self.camera_id = camera_id


# ---------------------------------------------------------------------------------------------
# torchrl (device-native, natively batched)


def _build_torchrl(
    opts: dict[str, Any], seed: int | None, device: torch.device, batch: int | None
) -> tuple[EnvBase, list[Transform]]:
    base, obs = device_envs.build(opts, seed, device, batch)
    if opts["max_episode_steps"] is None:  # PendulumEnv has no end of its own: gym's limit
        opts["max_episode_steps"] = device_envs.PENDULUM_STEPS
    return base, [*obs, *_continuous_action_transforms()]


def _build_brax(
    opts: dict[str, Any], seed: int | None, device: torch.device, batch: int | None
) -> tuple[EnvBase, list[Transform]]:
    base = device_envs.build_brax(opts, seed, device, batch)
    if opts["max_episode_steps"] is None:  # a Brax env never truncates by itself
        opts["max_episode_steps"] = device_envs.BRAX_STEPS
    return base, _continuous_action_transforms()


# ---------------------------------------------------------------------------------------------
# Crafter


def _build_crafter(
    opts: dict[str, Any], seed: int | None, device: torch.device
) -> tuple[EnvBase, list[Transform]]:
    task = opts["task"]
    if task not in CRAFTER_TASKS:
        raise ValueError(
            f"unknown crafter task {task!r}; valid tasks: reward (achievement and health "
            "rewards), noreward (reward always 0)"
        )
    env = CrafterEnv(
        reward=task == "reward", size=int(opts["image_size"]), render_size=opts["render_size"]
    )
    base = GymWrapper(env, frame_skip=int(opts["action_repeat"]), device=device)
    # Crafter draws the frame for any size: the eval video is rendered at render_size, not
    # upscaled from the agent's 64x64.
    render = [RenderFrame(env.render, opts["render_size"])] if opts["render"] else []
    obs = _image_transforms(base, opts)
    return base, [*obs, *render, *_action_transforms(env.action_space)]


class CrafterEnv(gym.Env):
    """Crafter (Hafner 2021) with the gymnasium API, as the reference runs it: 64x64 RGB
    frames, 17 discrete actions, episodes of at most 10000 steps.

    Crafter has the old gym API (``reset() -> obs``, ``step() -> obs, reward, done, info``)
    and one ``done`` for two ends: death, where its ``info["discount"]`` is 0 (termination,
    as the reference's ``is_terminal``), and its step limit (``length``), where the discount
    stays 1 (truncation). ``reset(seed=...)`` builds a new crafter world generator with that
    seed; crafter derives each episode's world from (seed, episode number).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        reward: bool = True,
        size: int = 64,
        length: int = 10000,
        render_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        try:
            import crafter
        except ImportError:
            raise ValueError(
                "env suite 'crafter' needs the crafter package: pip install -e '.[crafter]'"
            ) from None
        self._make = functools.partial(
            crafter.Env, size=(size, size), reward=reward, length=length
        )
        self._env = self._make(seed=seed)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(crafter.constants.actions))
        self.render_mode = "rgb_array"
        self.render_size = int(render_size or size)

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._env = self._make(seed=int(seed))
        return self._env.reset(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, done, info = self._env.step(int(action))
        terminated = info["discount"] == 0
        return obs, float(reward), terminated, bool(done) and not terminated, info

    def render(self) -> np.ndarray:
        """The current frame, HxWx3 uint8 at ``render_size`` (valid after a reset)."""
        return self._env.render((self.render_size, self.render_size))


# ---------------------------------------------------------------------------------------------
# Atari


def _build_atari(
    opts: dict[str, Any], seed: int | None, device: torch.device
) -> tuple[EnvBase, list[Transform]]:
    from ale_py.env import AtariEnv
    from ale_py.roms import get_all_rom_ids

    game = opts["task"]
    games = get_all_rom_ids()
    if game not in games:
        close = difflib.get_close_matches(game, games, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown atari game {game!r}; {hint}valid games are ALE rom ids "
            "(ale_py.roms.get_all_rom_ids(), e.g. pong, breakout, ms_pacman)"
        )
    ale = AtariEnv(
        game=game,
        obs_type="rgb",
        frameskip=1,  # the wrapper repeats actions itself so it can max-pool the last 2 frames
        repeat_action_probability=0.25 if opts["sticky"] else 0.0,
        full_action_space=False,  # the "needed" (minimal) action set
        max_num_frames_per_episode=ATARI_MAX_FRAMES,
    )
    env = AtariPreprocess(
        ale,
        repeat=int(opts["action_repeat"]),
        size=int(opts["image_size"]),
        grayscale=bool(opts["grayscale"]),
        noop_max=int(opts["noop_max"]),
    )
    base = GymWrapper(env, device=device)
    # The last raw RGB screen (before pooling, resizing and graying), whatever ``grayscale``.
    render = [RenderFrame(ale.ale.getScreenRGB, opts["render_size"])] if opts["render"] else []
    obs = _image_transforms(base, opts)
    return base, [*obs, *render, *_action_transforms(env.action_space)]


class AtariPreprocess(gym.Wrapper):
    """DreamerV3's Atari protocol on an ALE env created with ``frameskip=1``.

    Repeat each action ``repeat`` times summing rewards (stop early at game over or the frame
    limit), max-pool the last two frames, resize to ``size`` (antialiased bilinear), optionally
    gray; up to ``noop_max`` random NOOPs after reset. No life-loss signal, no reward clipping.

    Why not gymnasium's ``AtariPreprocessing``: it imports opencv, which is not a dependency.
    """

    GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

    def __init__(
        self,
        env: gym.Env,
        repeat: int = 4,
        size: int = 64,
        grayscale: bool = False,
        noop_max: int = 30,
    ) -> None:
        super().__init__(env)
        # NOOP must be action 0 for the reset no-ops; ALE's minimal sets always start with it.
        assert env.unwrapped.get_action_meanings()[0] == "NOOP"
        self.repeat, self.size, self.grayscale, self.noop_max = repeat, size, grayscale, noop_max
        shape = (size, size, 1 if grayscale else 3)
        self.observation_space = gym.spaces.Box(0, 255, shape, dtype=np.uint8)
        self._frames: deque[np.ndarray] = deque(maxlen=2)

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        frame, info = self.env.reset(seed=seed, options=options)
        for _ in range(self.np_random.integers(self.noop_max + 1)):
            frame, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                frame, info = self.env.reset()
        # Pool the first frame with itself, as the reference fills both buffers at reset.
        self._frames.extend([frame, frame])
        return self._observation(), info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        total = 0.0
        for _ in range(self.repeat):
            frame, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            self._frames.append(frame)
            if terminated or truncated:
                break
        return self._observation(), total, terminated, truncated, info

    def _observation(self) -> np.ndarray:
        frame = np.maximum(self._frames[0], self._frames[1])
        image = torch.from_numpy(frame).permute(2, 0, 1)
        image = resize_image(image, self.size).permute(1, 2, 0).numpy()
        if self.grayscale:
            gray = (image.astype(np.float32) * self.GRAY_WEIGHTS).sum(-1, keepdims=True)
            image = gray.astype(np.uint8)
        return image
