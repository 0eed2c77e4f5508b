"""Env layout the agent relies on: keys, dtypes, shapes, truncation vs termination, action
mapping, action repeat, Atari preprocessing and the error messages of `make_env`."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torchrl.data import Bounded, OneHot
from torchrl.envs.utils import check_env_specs

from dreamer_trl.envs import SUITES, make_env, resize_image

CONF = Path(__file__).resolve().parents[1] / "conf" / "env"
CONFIGS = [
    "cartpole",
    "pendulum",
    "dmc_walker",
    "dmc_cartpole",
    "dmc_walker_vision",
    "atari_pong",
]


def load(name: str, **overrides) -> DictConfig:
    """The ``env`` block of a shipped config (as Hydra would pass it), with overrides."""
    return OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml")["env"], overrides)


def step(env, td, action) -> TensorDict:
    """One env step with a given action; returns the step output (with "next")."""
    td = td.clone()
    td["action"] = torch.as_tensor(action, dtype=torch.float32)
    return env.step(td)


def check_episode_bookkeeping(rollout: TensorDict) -> None:
    """is_init marks each episode's first step; step_count and episode_reward restart there."""
    is_init, done = rollout["is_init"].squeeze(-1), rollout["next", "done"].squeeze(-1)
    assert is_init[0] and torch.equal(is_init[1:], done[:-1])
    count, total = 0, 0.0
    for t in range(rollout.shape[0]):
        count, total = (0, 0.0) if is_init[t] else (count, total)
        count, total = count + 1, total + rollout["next", "reward"][t].item()
        assert rollout["next", "step_count"][t].item() == count
        assert rollout["next", "episode_reward"][t].item() == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# layout of the six shipped configs


def test_config_files_share_keys():
    keys = {name: set(load(name)) for name in CONFIGS}
    assert all(k == keys["cartpole"] for k in keys.values()), keys
    for name in CONFIGS:
        assert (CONF / f"{name}.yaml").read_text().startswith("# @package _global_\n")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_layout(name):
    cfg = load(name)
    env = make_env(cfg, seed=0)
    check_env_specs(env)
    rollout = env.rollout(24, break_when_any_done=False)
    pixels = cfg["suite"] == "atari" or cfg["from_pixels"]

    nxt = rollout["next"]
    if pixels:
        assert nxt["pixels"].dtype == torch.uint8
        assert nxt["pixels"].shape == (24, 3, 64, 64)
        assert rollout["pixels"].shape == (24, 3, 64, 64)
        assert "observation" not in nxt.keys()
    else:
        assert nxt["observation"].dtype == torch.float32
        assert nxt["observation"].ndim == 2  # [T, D]: one flat vector per step
        assert "pixels" not in nxt.keys()

    assert nxt["reward"].dtype == torch.float32 and nxt["reward"].shape == (24, 1)
    for key in ("done", "terminated", "truncated", "is_init"):
        assert nxt[key].dtype == torch.bool and nxt[key].shape == (24, 1)
    check_episode_bookkeeping(rollout)

    spec = env.action_spec
    assert spec.dtype == torch.float32 and env.batch_size == torch.Size([])
    if cfg["suite"] == "atari" or cfg["task"] == "CartPole-v1":
        assert isinstance(spec, OneHot)
        assert (rollout["action"].sum(-1) == 1).all()
    else:
        assert isinstance(spec, Bounded) and spec.shape[-1] >= 1
        assert (spec.space.low == -1).all() and (spec.space.high == 1).all()
    if cfg["suite"] == "dmc":  # DMC never terminates
        assert not nxt["terminated"].any()


# ---------------------------------------------------------------------------------------------
# truncation is not termination


def test_gym_time_limit_is_truncation():
    env = make_env(load("cartpole", max_episode_steps=5), seed=0)
    td = env.reset()
    for t in range(5):  # alternate pushes: the pole cannot fall in 5 steps
        out = step(env, td, [1.0, 0.0] if t % 2 else [0.0, 1.0])
        td = out["next"]
    assert out["next", "truncated"].item() and out["next", "done"].item()
    assert not out["next", "terminated"].item()


def test_gym_failure_is_termination():
    env = make_env(load("cartpole"), seed=0)
    rollout = env.rollout(100, policy=lambda td: td.set("action", torch.tensor([0.0, 1.0])))
    assert rollout["next", "terminated"][-1].item() and not rollout["next", "truncated"].any()


def test_dmc_time_limit_is_truncation():
    env = make_env(load("dmc_walker"), seed=0)
    # Shorten dm_control's own 1000-step limit (private attribute; the config has no field).
    env.base_env._env._step_limit = 4
    rollout = env.rollout(10)  # stops at the first done
    assert rollout.shape == (4,)
    assert rollout["next", "truncated"][-1].item() and rollout["next", "done"][-1].item()
    assert not rollout["next", "terminated"].any()


def test_dmc_max_episode_steps_is_truncation():
    env = make_env(load("dmc_cartpole", max_episode_steps=3), seed=0)
    rollout = env.rollout(10, break_when_any_done=False)
    assert rollout["next", "truncated"].squeeze(-1).tolist()[:4] == [False, False, True, False]
    assert not rollout["next", "terminated"].any()
    assert rollout["is_init"].squeeze(-1).tolist()[:4] == [True, False, False, True]


# ---------------------------------------------------------------------------------------------
# actions


def test_continuous_actions_are_mapped_and_clipped():
    env = make_env(load("pendulum"), seed=0)  # true torque bounds [-2, 2]

    def to_env(action: float) -> float:
        td = TensorDict({"action": torch.tensor([action])}, batch_size=[])
        return env.transform.inv(td)["action"].item()

    assert to_env(1.0) == pytest.approx(2.0)
    assert to_env(-0.5) == pytest.approx(-1.0)
    assert to_env(5.0) == pytest.approx(2.0)  # clipped to 1 before scaling
    assert to_env(-7.0) == pytest.approx(-2.0)
    td = env.reset()
    step(env, td, [0.25])
    assert env.base_env._env.unwrapped.last_u == pytest.approx(0.5)  # torque applied


def test_dmc_actions_are_clipped():
    env = make_env(load("dmc_cartpole"), seed=0)
    td = TensorDict({"action": torch.tensor([3.0])}, batch_size=[])
    assert env.transform.inv(td)["action"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# action repeat


def test_action_repeat_sums_rewards():
    single = make_env(load("pendulum"), seed=3)
    repeat = make_env(load("pendulum", action_repeat=3), seed=3)
    td1, td3 = single.reset(), repeat.reset()
    torch.testing.assert_close(td1["observation"], td3["observation"])
    for action in torch.linspace(-1, 1, 5):
        rewards = []
        for _ in range(3):
            out1 = step(single, td1, [action])
            rewards.append(out1["next", "reward"])
            td1 = out1["next"]
        out3 = step(repeat, td3, [action])
        td3 = out3["next"]
        torch.testing.assert_close(out3["next", "reward"], sum(rewards))
        torch.testing.assert_close(td3["observation"], td1["observation"])


def test_action_repeat_stops_at_done():
    push = lambda td: td.set("action", torch.tensor([0.0, 1.0]))  # noqa: E731
    single = make_env(load("cartpole"), seed=1).rollout(100, policy=push)
    repeat = make_env(load("cartpole", action_repeat=4), seed=1).rollout(100, policy=push)
    length = single.shape[0]
    assert repeat.shape[0] == math.ceil(length / 4)
    assert repeat["next", "episode_reward"][-1].item() == length  # +1 per frame, none after done
    assert repeat["next", "terminated"][-1].item()


# ---------------------------------------------------------------------------------------------
# Atari preprocessing


def test_atari_matches_manual_reference_loop():
    """Repeat 4, sum rewards, max-pool the last two frames, resize: checked frame by frame."""
    from ale_py.env import AtariEnv

    env = make_env(load("atari_pong", noop_max=0), seed=0)
    ale = AtariEnv(game="pong", frameskip=1, repeat_action_probability=0.0)
    frame, _ = ale.reset(seed=0)
    frame, _ = ale.reset()  # make_env's set_seed resets once, env.reset() once more
    td = env.reset()
    frames = [frame, frame]
    rng = np.random.default_rng(0)
    for _ in range(40):
        action = int(rng.integers(6))
        reward = 0.0
        for _ in range(4):
            frame, r, *_ = ale.step(action)
            reward += r
            frames = [frames[1], frame]
        expected = resize_image(torch.from_numpy(np.maximum(*frames)).permute(2, 0, 1), 64)
        out = step(env, td, torch.nn.functional.one_hot(torch.tensor(action), 6))
        td = out["next"]
        assert torch.equal(td["pixels"], expected)
        assert out["next", "reward"].item() == reward


def test_atari_game_over_is_termination():
    # Breakout ends after 5 lost balls (a few hundred random steps); lives never end an episode.
    env = make_env(load("atari_pong", task="breakout"), seed=0)
    rollout = env.rollout(3000)
    assert rollout["next", "terminated"][-1].item() and not rollout["next", "truncated"].any()
    assert rollout["next", "done"].sum().item() == 1


def test_atari_noops_and_grayscale():
    env = make_env(load("atari_pong", grayscale=True, task="breakout"), seed=0)
    td = env.reset()
    assert td["pixels"].shape == (1, 64, 64) and td["pixels"].dtype == torch.uint8
    ale = env.base_env._env.unwrapped.ale
    assert 0 <= ale.getEpisodeFrameNumber() <= 30  # random no-ops after reset
    assert env.action_spec.shape == (4,)  # breakout's minimal ("needed") action set


# ---------------------------------------------------------------------------------------------
# seeding


@pytest.mark.parametrize("name", ["cartpole", "dmc_walker"])
def test_seed_makes_resets_reproducible(name):
    first = [make_env(load(name), seed=s).reset()["observation"] for s in (7, 7, 8)]
    torch.testing.assert_close(first[0], first[1])
    assert not torch.equal(first[0], first[2])


# ---------------------------------------------------------------------------------------------
# generic gym spaces (toy envs registered inline)


class ToyEnv(gym.Env):
    def __init__(self, observation_space: gym.Space, action_space: gym.Space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


TOYS = {
    "Rgb96": (gym.spaces.Box(0, 255, (96, 96, 3), np.uint8), gym.spaces.Discrete(3)),
    "Gray32": (gym.spaces.Box(0, 255, (32, 32, 1), np.uint8), gym.spaces.Discrete(3)),
    "Matrix": (gym.spaces.Box(-1, 1, (3, 4), np.float64), gym.spaces.Box(-3, 3, (2,))),
    "MultiDiscrete": (gym.spaces.Box(-1, 1, (3,)), gym.spaces.MultiDiscrete([2, 3])),
    "DictObs": (gym.spaces.Dict(a=gym.spaces.Box(-1, 1, (3,))), gym.spaces.Discrete(2)),
}


def toy(name: str) -> dict:
    env_id = f"DreamerTrlTest/{name}-v0"
    if env_id not in gym.registry:
        obs, act = TOYS[name]
        gym.register(env_id, entry_point=lambda: ToyEnv(obs, act), max_episode_steps=50)
    return {"suite": "gym", "task": env_id}


@pytest.mark.parametrize("name, channels", [("Rgb96", 3), ("Gray32", 1)])
def test_gym_images_become_channel_first_pixels(name, channels):
    env = make_env(toy(name), seed=0)
    check_env_specs(env)
    td = env.rollout(3)
    assert td["next", "pixels"].shape == (3, channels, 64, 64)
    assert td["next", "pixels"].dtype == torch.uint8


def test_gym_suite_accepts_ale_ids():
    env = make_env({"suite": "gym", "task": "ALE/Pong-v5"}, seed=0)
    assert env.reset()["pixels"].shape == (3, 64, 64)  # 210x160 RGB resized


def test_gym_matrix_observation_is_flattened():
    env = make_env(toy("Matrix"), seed=0)
    check_env_specs(env)
    obs = env.rollout(3)["next", "observation"]
    assert obs.shape == (3, 12) and obs.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# render=True: a "render" frame for eval videos, nothing else changed


def check_render(cfg, steps: int = 6, size: int = 128, action=None) -> torch.Tensor:
    """Rollouts with and without render=True match except for "render" [3, size, size] uint8,
    whose frames (reset + each step) change over the rollout. Returns the frames [T+1, ...]."""
    env, plain = make_env(cfg, seed=0, render=True), make_env(cfg, seed=0)
    assert env.observation_spec["render"] == Bounded(0, 255, (3, size, size), dtype=torch.uint8)
    spec = env.observation_spec.clone()
    del spec["render"]
    assert spec == plain.observation_spec
    torch.manual_seed(0)
    actions = [plain.action_spec.rand() if action is None else action for _ in range(steps)]
    out = env.rollout(steps, actions=actions, break_when_any_done=False)
    ref = plain.rollout(steps, actions=actions, break_when_any_done=False)
    assert (out.exclude("render", ("next", "render")) == ref).all()
    frames = torch.cat([out["render"], out["next", "render"][-1:]])
    assert frames.dtype == torch.uint8 and frames.shape == (steps + 1, 3, size, size)
    assert torch.equal(out["render"][1:], out["next", "render"][:-1])
    assert not torch.equal(frames[0], frames[-1])
    return frames


@pytest.mark.parametrize("name, action", [("cartpole", [0.0, 1.0]), ("pendulum", [1.0])])
def test_render_gym(name, action):
    check_render(load(name), steps=8, action=torch.tensor(action))  # a steady push moves it


def test_render_gym_size_and_fallback():
    push = torch.tensor([0.0, 1.0])
    check_render(load("cartpole", render_size=64), steps=8, action=push, size=64)
    # An image env that cannot render shows its observations; a vector one cannot be rendered.
    env = make_env(toy("Gray32"), seed=0, render=True)
    td = env.rollout(2)
    assert td["render"].shape == (2, 3, 128, 128) and td["render"].dtype == torch.uint8
    assert torch.equal(td["next", "render"][:, 0], resize_image(td["next", "pixels"], 128)[:, 0])
    with pytest.raises(ValueError, match=r"render=True needs a gym env that renders"):
        make_env(toy("Matrix"), render=True)


def test_render_dmc():
    check_render(load("dmc_cartpole"), steps=4)
    # Same camera as the agent's pixels: at the same size the frames are identical.
    env = make_env(load("dmc_walker_vision", render_size=64), seed=0, render=True)
    td = env.rollout(3)
    assert torch.equal(td["render"], td["pixels"]) and td["render"].shape == (3, 3, 64, 64)


def test_render_atari():
    frames = check_render(load("atari_pong", grayscale=True), steps=12)
    # The raw RGB screen (not the pooled gray 64x64 observation), resized.
    ale = make_env(load("atari_pong"), seed=0, render=True)
    td = ale.rollout(3)
    screen = ale.base_env._env.unwrapped.ale.getScreenRGB()
    expected = resize_image(torch.from_numpy(screen).permute(2, 0, 1), 128)
    assert torch.equal(td["next", "render"][-1], expected)
    assert frames.shape[1] == 3  # RGB even when the agent sees gray


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"suite": "mujoco", "task": "x"}, r"unknown env suite 'mujoco'.*gym, dmc, atari"),
        ({"suite": "gym", "task": "NoSuchEnv-v0"}, r"unknown gym id 'NoSuchEnv-v0'.*registered"),
        ({"suite": "gym", "task": "CartPole-v9"}, r"unknown gym id .*did you mean CartPole-v1"),
        ({"suite": "dmc", "task": "walker-fly"}, r"unknown dmc task 'walker-fly'.*walker-walk"),
        ({"suite": "dmc", "task": "walker_walk"}, r"expected 'domain-task'.*cheetah-run"),
        ({"suite": "atari", "task": "pongg"}, r"unknown atari game 'pongg'.*did you mean pong"),
        ({"suite": "gym", "task": "CartPole-v1", "from_pixels": True}, r"from_pixels=True"),
    ],
)
def test_clear_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        make_env(cfg)


@pytest.mark.parametrize(
    "name, message",
    [
        ("MultiDiscrete", r"unsupported action space MultiDiscrete\(\[2 3\]\).*Discrete or Box"),
        ("DictObs", r"unsupported observation space Dict\(.*uint8 HxWxC images"),
    ],
)
def test_unsupported_spaces(name, message):
    with pytest.raises(ValueError, match=message):
        make_env(toy(name))


def test_suites_constant():
    assert SUITES == ("gym", "dmc", "atari", "crafter", "torchrl", "brax")
