"""The reference's domain presets (conf/env/dmc_vision, atari100k, crafter), the crafter suite
and integer observations (one-hot in, one categorical per element out), through the real
composition, env builder, world model and `pipelines/train.py`.

The expected preset values are literals read from the reference's dreamerv3/configs.yaml
(danijar/dreamerv3): its `defaults` block (model size = size200m, env.dmc / env.atari100k /
env.crafter), and the `dmc_vision`, `atari100k` and `crafter` blocks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import signal
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torchrl.data import Binary, Bounded, Categorical, MultiCategorical, OneHot, Unbounded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamer_trl.agent import obs_space_from_spec  # noqa: E402
from dreamer_trl.checkpoint import find_checkpoint  # noqa: E402
from dreamer_trl.envs import CrafterEnv, make_env  # noqa: E402
from dreamer_trl.heads import CategoricalVectorHead  # noqa: E402
from dreamer_trl.world_model import (  # noqa: E402
    MAX_INT_CLASSES,
    IntegerOneHot,
    IntVector,
    MultiDecoder,
    MultiEncoder,
    ObsSpace,
)
from pipelines import train  # noqa: E402
from pipelines.common import compose_config, run_cli  # noqa: E402

# The reference's default model (configs.yaml `defaults`: rssm deter 8192, hidden 1024,
# classes 64; enc/dec depth 64, units 1024), which none of the three presets changes.
SIZE200M = {"deter": 8192, "hidden": 1024, "classes": 64, "depth": 64, "units": 1024}
# configs.yaml: dmc_vision `run: {steps: 1.1e6, train_ratio: 256}`, `env.dmc.proprio: False`;
# env.dmc `{size: [64, 64], repeat: 1}`; task dmc_walker_walk.
DMC_VISION = {
    "train": {"train_ratio": 256, "total_steps": 1_100_000},
    "env": {"suite": "dmc", "task": "walker-walk", "from_pixels": True, "image_size": 64,
            "action_repeat": 1},
    "envs": 16,  # `defaults` run.envs
}
# configs.yaml: atari100k `run: {steps: 1.1e5, envs: 1, train_ratio: 256}`; env.atari100k
# `{size: [64, 64], repeat: 4, sticky: False, gray: False, actions: needed, noops: 30}`;
# task atari100k_pong.
ATARI100K = {
    "train": {"train_ratio": 256, "total_steps": 110_000},
    "env": {"suite": "atari", "task": "pong", "image_size": 64, "action_repeat": 4,
            "sticky": False, "grayscale": False, "noop_max": 30},
    "envs": 1,
}
# configs.yaml: crafter `run: {steps: 1.1e6, envs: 1, train_ratio: 512}`; env.crafter
# `{size: [64, 64]}`; task crafter_reward (no repeat key: one env step per action).
CRAFTER = {
    "train": {"train_ratio": 512, "total_steps": 1_100_000},
    "env": {"suite": "crafter", "task": "reward", "image_size": 64, "action_repeat": 1},
    "envs": 1,
}
PRESETS = {"dmc_vision": DMC_VISION, "atari100k": ATARI100K, "crafter": CRAFTER}
needs_crafter = pytest.mark.skipif(
    importlib.util.find_spec("crafter") is None,
    reason="crafter not installed (pip install -e '.[crafter]'; the dev extra includes it)",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two torch threads on a busy 2-core machine are pathologically slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_reference_values(name):
    cfg = compose_config([f"env={name}"])  # composed and validated as train.py does
    expected = PRESETS[name]
    assert {k: cfg.model[k] for k in SIZE200M} == SIZE200M and cfg.model.name == "size200m"
    assert {k: cfg.train[k] for k in expected["train"]} == expected["train"]
    assert {k: cfg.env[k] for k in expected["env"]} == expected["env"]
    # The rest of the training setup stays the project's (reference) defaults.
    assert (cfg.train.batch_size, cfg.train.seq_len, cfg.collector.num_workers) == (16, 64, 1)
    assert cfg.collector.envs == expected["envs"]  # the reference's run.envs


@pytest.mark.parametrize("name", ["dmc_walker", "dmc_cartpole", "dmc_walker_vision"])
def test_dmc_proprio_presets_step_the_references_16_envs(name):
    assert compose_config([f"env={name}"]).collector.envs == 16  # dmc_proprio: run.envs 16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_command_line_wins_over_a_preset(name):
    cfg = compose_config([f"env={name}", "model=size1m", "train.train_ratio=32"])
    assert cfg.model.name == "size1m" and cfg.model.deter == 512
    assert cfg.train.train_ratio == 32
    assert cfg.train.total_steps == PRESETS[name]["train"]["total_steps"]
    # Same with the model given before the env on the command line.
    assert compose_config(["model=size12m", f"env={name}"]).model.name == "size12m"


def test_preset_tasks_are_configurable():
    cfg = compose_config(["env=atari100k", "env.task=breakout"])
    assert (cfg.env.task, cfg.model.name, cfg.train.train_ratio) == ("breakout", "size200m", 256)
    assert compose_config(["env=dmc_vision", "env.task=cheetah-run"]).env.task == "cheetah-run"
    assert compose_config(["env=crafter", "env.task=noreward"]).env.task == "noreward"
    # train.py names a run after an overridden task (runs/breakout/), as for any env config.
    assert train.name_after_task(["env=atari100k", "env.task=breakout"])[-1] == "env.name=breakout"


def test_existing_env_configs_are_unchanged():
    for name, (suite, repeat) in {
        "dmc_walker": ("dmc", 1),
        "dmc_walker_vision": ("dmc", 1),
        "atari_pong": ("atari", 4),
    }.items():
        cfg = compose_config([f"env={name}"])
        assert cfg.model.name == "size1m" and cfg.train.train_ratio == 1024
        assert cfg.train.total_steps == 1_100_000
        assert (cfg.env.name, cfg.env.suite, cfg.env.action_repeat) == (name, suite, repeat)


def test_bad_crafter_task_is_one_line():
    with pytest.raises(ValueError, match=r"env.task=nope is invalid: must be reward or noreward"):
        compose_config(["env=crafter", "env.task=nope"])
    with pytest.raises(ValueError, match=r"unknown crafter task 'nope'.*reward.*noreward"):
        make_env({"suite": "crafter", "task": "nope"})


# --------------------------------------------------------------------------- crafter


def test_crafter_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "crafter", None)  # import crafter now raises ImportError
    with pytest.raises(ValueError, match=r"needs the crafter package: pip install -e '\.\["):
        make_env({"suite": "crafter", "task": "reward"})


@needs_crafter
def test_crafter_env_specs_and_steps():
    env = make_env({"suite": "crafter", "task": "reward"}, seed=0)
    pixels = env.observation_spec["pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
    assert isinstance(env.action_spec, OneHot) and env.action_spec.shape == (17,)
    assert env.action_spec.dtype == torch.float32
    td = env.rollout(4, break_when_any_done=False)
    assert td["next", "pixels"].shape == (4, 3, 64, 64)
    assert td["next", "pixels"].dtype == torch.uint8 and td["next", "pixels"].float().std() > 0
    assert td["next", "reward"].dtype == torch.float32
    assert not td["next", "done"].any()


@needs_crafter
def test_crafter_death_is_termination_and_length_is_truncation():
    env = make_env({"suite": "crafter", "task": "reward"}, seed=0)
    td = env.reset()
    crafter_env = env.base_env._env
    assert isinstance(crafter_env, CrafterEnv)
    crafter_env._env._player.health = 0  # dies in the next step: info["discount"] == 0
    td["action"] = env.action_spec.zero()
    td["action"][0] = 1.0  # noop
    out = env.step(td)["next"]
    assert out["terminated"].item() and out["done"].item() and not out["truncated"].item()

    # Crafter's own step limit ends the episode with discount 1: a time limit.
    short = CrafterEnv(reward=True, length=3, seed=0)
    short.reset(seed=0)
    ends = [short.step(0)[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]


# --------------------------------------------------------------------------- integer obs


def test_integer_onehot_and_categorical_decoder():
    space = ObsSpace(
        {"state": 2}, {}, {"observation": IntVector(low=(0, -1), classes=(3, 5))}
    )
    assert space.keys == ["state", "observation"]
    onehot = IntegerOneHot(space.integers["observation"])
    x = torch.tensor([[2, -1], [0, 3]])
    expected = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]]).float()
    assert torch.equal(onehot(x), expected)

    enc = MultiEncoder(space, units=16, layers=2, depth=2)
    assert enc.mlp[0].linear.in_features == 2 + 3 + 5  # float dims + one-hot widths
    obs = {"state": torch.randn(4, 6, 2), "observation": torch.stack(
        [torch.randint(0, 3, (4, 6)), torch.randint(-1, 4, (4, 6))], -1)}
    assert enc(obs).shape == (4, 6, 16)

    dec = MultiDecoder(space, deter=8, stoch=8, units=16, layers=2, depth=2)
    feat = torch.randn(4, 6, 16, requires_grad=True)
    logp = dec(feat)["observation"]
    assert logp.shape == (4, 6, 2, 5)  # one categorical per element, padded to 5 classes
    assert torch.allclose(logp.exp().sum(-1), torch.ones(4, 6, 2))
    assert torch.isinf(logp[..., 0, 3:]).all()  # element 0 has 3 classes: padding has p = 0
    loss = dec.loss(feat, obs)
    assert loss.shape == (4, 6) and torch.isfinite(loss).all()
    target = obs["observation"] - torch.tensor([0, -1])
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
    vec = (dec(feat)["state"] - torch.sign(obs["state"]) * torch.log1p(obs["state"].abs()))
    assert torch.allclose(loss, ce + vec.square().sum(-1), atol=1e-5)
    loss.mean().backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters() if p.grad is not None)


def test_categorical_head_uniform_classes():
    head = CategoricalVectorHead(8, [4, 4, 4])
    assert not hasattr(head, "index")  # no padding needed
    logp = head(torch.randn(5, 8))
    assert logp.shape == (5, 3, 4)
    assert head.predict(logp).shape == (5, 3) and head.loss(logp, torch.zeros(5, 3)).shape == (5,)


@pytest.mark.parametrize(
    "spec, low, classes",
    [
        (Bounded(low=torch.tensor([0, -2]), high=torch.tensor([15, 2]), shape=(2,),
                 dtype=torch.int64), (0, -2), (16, 5)),
        (Categorical(n=6, shape=(3,)), (0, 0, 0), (6, 6, 6)),
        (MultiCategorical(nvec=[2, 7]), (0, 0), (2, 7)),
        (Binary(n=2), (0, 0), (2, 2)),
    ],
)
def test_int_vector_from_spec(spec, low, classes):
    assert IntVector.from_spec(spec) == IntVector(low, classes)


@pytest.mark.parametrize(
    "spec, message",
    [
        (Unbounded(shape=(5,), dtype=torch.int64), r"no class bounds.*supported: float vectors"),
        (Bounded(0, MAX_INT_CLASSES, shape=(1,), dtype=torch.int64), r"1 to 1024 per element"),
    ],
)
def test_unreadable_integer_specs_are_one_line(spec, message):
    from torchrl.data import Composite

    with pytest.raises(ValueError, match=message):
        obs_space_from_spec(Composite(observation=spec))


class ToyEnv(gym.Env):
    def __init__(self, observation_space: gym.Space):
        self.observation_space, self.action_space = observation_space, gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


TOYS = {
    "MultiDiscreteObs": gym.spaces.MultiDiscrete([3, 4], start=[1, -2]),
    "MultiBinaryObs": gym.spaces.MultiBinary(3),
    "IntBoxObs": gym.spaces.Box(0, 9, (2, 2), np.int32),
    "WideIntBoxObs": gym.spaces.Box(0, 100_000, (2,), np.int64),  # too wide: a float vector
    "MixedTupleObs": gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Box(-1, 1, (2,))]),
}


def toy(name: str) -> dict:
    env_id = f"DreamerTrlPresetsTest/{name}-v0"
    if env_id not in gym.registry:
        space = TOYS[name]
        gym.register(env_id, entry_point=lambda: ToyEnv(space), max_episode_steps=20)
    return {"suite": "gym", "task": env_id}


@pytest.mark.parametrize(
    "cfg, low, classes",
    [
        ({"suite": "gym", "task": "FrozenLake-v1"}, (0,), (16,)),
        ({"suite": "gym", "task": "Taxi-v4"}, (0,), (500,)),
        ({"suite": "gym", "task": "Blackjack-v1"}, (0, 0, 0), (32, 11, 2)),  # a Tuple space
        (toy("MultiDiscreteObs"), (1, -2), (3, 4)),
        (toy("MultiBinaryObs"), (0, 0, 0), (2, 2, 2)),
        (toy("IntBoxObs"), (0, 0, 0, 0), (10, 10, 10, 10)),
    ],
)
def test_integer_gym_observations_stay_integers(cfg, low, classes):
    env = make_env(cfg, seed=0)
    spec = env.observation_spec["observation"]
    assert spec.dtype == torch.int64 and spec.shape == (len(classes),)
    td = env.rollout(5, break_when_any_done=False)
    obs = td["next", "observation"]
    assert obs.dtype == torch.int64 and spec.is_in(obs)
    assert obs_space_from_spec(env.observation_spec) == ObsSpace(
        {}, {}, {"observation": IntVector(low, classes)}
    )


def test_unsupported_observations_still_one_line():
    env = make_env(toy("WideIntBoxObs"), seed=0)  # as before integer observations: floats
    assert env.observation_spec["observation"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"unsupported observation space Tuple\(.*Tuple only"):
        make_env(toy("MixedTupleObs"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield tmp_path
    for sig, handler in handlers.items():  # train.main turns SIGTERM into KeyboardInterrupt
        signal.signal(sig, handler)


# tests/test_pipeline.py's TINY run: size1m shrunk to ~40k params, 64 env steps, 3 updates.
TINY = [
    "model.deter=64", "model.hidden=16", "model.units=16", "model.classes=4", "model.depth=2",
    "train.total_steps=64", "train.train_start=32", "train.random_steps=32",
    "train.batch_size=2", "train.seq_len=8", "train.train_ratio=1", "train.log_every=16",
    "train.eval_episodes=1", "train.progress=false", "replay.capacity=1000", "threads=1",
    "device=cpu", "compile.policy=false", "compile.steps=false", "eval.video=false",
]


def test_train_on_an_integer_observation_env(workdir):
    run_dir = workdir / "run"
    argv = ["env=cartpole", "env.task=FrozenLake-v1", "env.name=frozenlake", *TINY,
            f"run_dir={run_dir}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(train.main, argv)
    assert code == 0, out.getvalue()
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("frozenlake").experiment_id])
    metrics = run.data.metrics
    assert metrics["perf/updates"] == 3
    for key in ("train/loss_rec", "train/loss_rew", "train/loss_dyn", "train/loss_policy"):
        assert math.isfinite(metrics[key]), (key, metrics)
    # One categorical over 16 cells: the reconstruction loss is a cross-entropy (> 0).
    assert metrics["train/loss_rec"] > 0
    assert find_checkpoint(run_dir) == run_dir / "checkpoints" / "step_64"
