"""The agent built from TorchRL specs: the reference's size1m parameter count, discrete and
image agents, spec validation errors, and an overfit check of ``update``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensordict import TensorDict
from tiny import MODEL
from torchrl.data import Bounded, Categorical, Composite, OneHot, Unbounded

from dreamer_trl.agent import DreamerV3Agent, action_info, obs_space_from_spec
from dreamer_trl.world_model import ObsSpace

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = MODEL
FAST = {"optim": {"lr": 1e-3, "warmup": 0}}


def walker_specs():
    obs = Composite(observation=Unbounded(shape=(24,)))
    act = Bounded(low=-1.0, high=1.0, shape=(6,))
    return obs, act


@pytest.fixture(scope="module")
def size1m_agent(_single_thread) -> DreamerV3Agent:
    model = yaml.safe_load((CONF / "model" / "size1m.yaml").read_text())
    algo = yaml.safe_load((CONF / "algo" / "dreamerv3.yaml").read_text())
    torch.manual_seed(0)
    return DreamerV3Agent.from_specs(*walker_specs(), model, algo)


def make_batch(agent: DreamerV3Agent, obs: dict, b: int, t1: int, seed: int = 0) -> TensorDict:
    """Replay steps [B, T+1] with the given observations and random actions/rewards."""
    g = torch.Generator().manual_seed(seed)
    rssm = agent.world_model.rssm
    if agent.discrete:
        index = torch.randint(0, agent.action_dim, (b, t1), generator=g)
        action = torch.nn.functional.one_hot(index, agent.action_dim).float()
    else:
        action = 2 * torch.rand(b, t1, agent.action_dim, generator=g) - 1
    first = torch.zeros(b, t1, dtype=torch.bool)
    first[:, 0] = True
    return TensorDict(
        {
            **obs,
            "action": action,
            "reward": torch.randn(b, t1, generator=g),
            "is_first": first,
            "is_last": torch.zeros(b, t1, dtype=torch.bool),
            "is_terminal": torch.zeros(b, t1, dtype=torch.bool),
            "deter": torch.zeros(b, t1, rssm.deter),
            "stoch": torch.zeros(b, t1, rssm.stoch, rssm.classes),
        },
        [b, t1],
    )


def _finite_losses(out: TensorDict) -> None:
    for k in ("rec", "rew", "con", "dyn", "rep", "policy", "value", "repval"):
        assert torch.isfinite(out[f"loss_{k}"]), k


# --------------------------------------------------------------------------- size1m


def test_size1m_walker_parameter_count(size1m_agent):
    assert size1m_agent.num_params() == 640_867  # the reference's count for this preset


def test_size1m_layout(size1m_agent):
    wm = size1m_agent.world_model
    rssm = wm.rssm
    assert (rssm.deter, rssm.stoch, rssm.classes, rssm.blocks) == (512, 32, 4, 8)
    assert rssm.dynin0.linear.out_features == 64  # hidden
    assert len(wm.encoder.mlp) == 3 and wm.encoder.out_features == 64
    assert len(size1m_agent.actor.mlp) == 3 and len(size1m_agent.critic.mlp) == 3
    assert size1m_agent.critic.bins.shape == (255,)
    assert not size1m_agent.discrete and size1m_agent.action_dim == 6
    # the slow critic is not trained
    trained = {id(p) for m in size1m_agent.trained_modules() for p in m.parameters()}
    assert all(id(p) not in trained for p in size1m_agent.loss.slow_critic.parameters())
    assert {id(p) for g in size1m_agent.optimizer.param_groups for p in g["params"]} == trained


# --------------------------------------------------------------------------- specs


def test_discrete_agent_from_onehot_spec():
    torch.manual_seed(0)
    obs_spec = Composite(observation=Unbounded(shape=(4,)))
    agent = DreamerV3Agent.from_specs(obs_spec, OneHot(3), TINY, FAST)
    assert agent.discrete and agent.action_dim == 3
    assert agent.obs_space == ObsSpace({"observation": 4}, {})
    feat = torch.randn(5, agent.world_model.rssm.feat_dim)
    params = agent.actor(feat)
    assert params.shape == (5, 3)
    torch.testing.assert_close(params.exp().sum(-1), torch.ones(5))
    batch = make_batch(agent, {"observation": torch.randn(2, 5, 4)}, 2, 5)
    torch.manual_seed(0)
    out = agent.update(batch)
    _finite_losses(out)
    assert out["deter"].shape == (2, 4, 64)


def test_action_info_supported():
    assert action_info(OneHot(5)) == (5, True)
    assert action_info(Bounded(low=-1.0, high=1.0, shape=(6,))) == (6, False)
    assert action_info(Unbounded(shape=(2,))) == (2, False)


def test_categorical_action_spec_rejected():
    with pytest.raises(ValueError, match="OneHot") as err:
        action_info(Categorical(3))
    assert "categorical_action_encoding" in str(err.value)


def test_integer_action_spec_rejected():
    with pytest.raises(ValueError, match="supported"):
        action_info(Unbounded(shape=(2,), dtype=torch.int64))


def test_obs_space_vectors_and_images():
    spec = Composite(
        observation=Unbounded(shape=(24,)),
        pixels=Bounded(low=0, high=255, shape=(3, 64, 64), dtype=torch.uint8),
        other=Unbounded(shape=(2,)),
    )
    space = obs_space_from_spec(spec)  # default keys: observation and pixels
    assert space == ObsSpace({"observation": 24}, {"pixels": (3, 64, 64)})
    assert obs_space_from_spec(spec, ["other"]) == ObsSpace({"other": 2}, {})


def test_uint8_2d_observation_rejected():
    spec = Composite(pixels=Bounded(low=0, high=255, shape=(64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixels") as err:
        obs_space_from_spec(spec)
    assert "uint8 images [C, H, W]" in str(err.value)


def test_int_vector_observation_rejected():
    spec = Composite(observation=Unbounded(shape=(5,), dtype=torch.int64))
    with pytest.raises(ValueError, match="observation") as err:
        obs_space_from_spec(spec)
    assert "float vectors" in str(err.value)


def test_missing_or_unknown_observation_keys_rejected():
    spec = Composite(state=Unbounded(shape=(3,)))
    with pytest.raises(ValueError, match="obs_keys"):
        obs_space_from_spec(spec)
    with pytest.raises(ValueError, match="nope"):
        obs_space_from_spec(spec, ["nope"])


def test_float_multidim_observation_rejected():
    spec = Composite(pixels=Unbounded(shape=(3, 64, 64)))
    with pytest.raises(ValueError, match="pixels"):
        obs_space_from_spec(spec)


def test_batched_env_vector_spec_still_accepted():
    spec = Composite(observation=Unbounded(shape=(4, 24)), shape=(4,))
    assert obs_space_from_spec(spec) == ObsSpace({"observation": 24}, {})


# --------------------------------------------------------------------------- training


def test_update_overfits_one_batch():
    torch.manual_seed(0)
    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    algo = {"optim": {"lr": 3e-3, "warmup": 0}}
    agent = DreamerV3Agent(ObsSpace({"observation": 6}, {}), 2, False, model, algo)
    g = torch.Generator().manual_seed(0)
    obs = 2 * torch.randn(4, 17, 6, generator=g)
    batch = make_batch(agent, {"observation": obs}, 4, 17)
    batch["reward"] = (obs[..., 0] > 0).float()  # a reward the model can read off the obs
    history = []
    for _ in range(60):
        out = agent.update(batch)
        history.append((out["loss_rec"].item(), out["loss_rew"].item()))
    _finite_losses(out)
    (rec0, rew0), (rec1, rew1) = history[0], history[-1]
    assert rec1 + rew1 < 0.5 * (rec0 + rew0), history
    assert rec1 < 0.7 * rec0 and rew1 < 0.5 * rew0, history


@pytest.mark.parametrize("with_vector", [False, True])
def test_image_agent_runs_one_update(with_vector):
    torch.manual_seed(0)
    spec = Composite(pixels=Bounded(low=0, high=255, shape=(3, 64, 64), dtype=torch.uint8))
    obs = {"pixels": torch.randint(0, 256, (2, 4, 3, 64, 64), dtype=torch.uint8)}
    if with_vector:
        spec["observation"] = Unbounded(shape=(5,))
        obs["observation"] = torch.randn(2, 4, 5)
    agent = DreamerV3Agent.from_specs(spec, Bounded(low=-1.0, high=1.0, shape=(2,)), TINY, FAST)
    assert agent.obs_space.images == {"pixels": (3, 64, 64)}
    assert agent.world_model.encoder.out_features == 8 * 4 * 4 + (16 if with_vector else 0)
    before = [p.detach().clone() for p in agent.world_model.parameters()]
    out = agent.update(make_batch(agent, obs, 2, 4))
    _finite_losses(out)
    # image reconstruction: sum over 3·64·64 squared errors of pixels vs a ≈0.5 prediction
    assert 1000 < out["raw_rec"].item() < 3 * 64 * 64
    changed = [not torch.equal(p, b) for p, b in zip(agent.world_model.parameters(), before)]
    assert sum(changed) > 0.9 * len(changed)
    assert out["deter"].shape == (2, 3, 64) and out["stoch"].shape == (2, 3, 32, 4)


def test_open_loop_video_layout():
    """Real / predicted / error rows, one column per sequence, every replayed step."""
    from tensordict import TensorDict

    from dreamer_trl.report import open_loop_video

    torch.manual_seed(0)
    space = ObsSpace({}, {"pixels": (3, 64, 64)})
    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(space, 2, False, model, {})
    b, t1 = 3, 9
    batch = TensorDict(
        {
            "pixels": torch.randint(0, 256, (b, t1, 3, 64, 64), dtype=torch.uint8),
            "action": torch.rand(b, t1, 2) * 2 - 1,
            "reward": torch.zeros(b, t1),
            "is_first": torch.zeros(b, t1, dtype=torch.bool),
            "is_last": torch.zeros(b, t1, dtype=torch.bool),
            "is_terminal": torch.zeros(b, t1, dtype=torch.bool),
            "deter": torch.zeros(b, t1, 64),
            "stoch": torch.zeros(b, t1, 32, 4),
        },
        [b, t1],
    )
    frames = open_loop_video(agent, batch, context=3, columns=2)
    assert frames.shape == (t1 - 1, 3 * 64, 2 * 64, 3) and frames.dtype == np.uint8
    true = batch["pixels"][0, 1:].permute(0, 2, 3, 1).numpy()
    assert (frames[:, :64, :64] == true).all()  # top-left tile: the real frames


@pytest.mark.parametrize("discrete", [False, True])
def test_paper2023_config_updates(discrete):
    """algo=dreamerv3_2023 composes and trains: LayerNorm, symlog bins, dyn 0.5, Adam, and
    the dynamics-backprop actor for continuous actions."""
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.bench import synthetic_batch
    from pipelines.common import compose_config

    algo = OmegaConf.to_container(compose_config(["algo=dreamerv3_2023"]).algo)
    assert algo["norm"] == "layer" and algo["bins"] == "symlog"
    assert algo["loss_scales"]["dyn"] == 0.5 and algo["optim"]["name"] == "adam"
    algo["vector_units"] = 16  # 2023's 1024 (tests/test_algo_2023.py) takes seconds to init
    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(ObsSpace({"observation": 24}, {}), 6, discrete, model, algo)
    assert agent.loss.actor_loss.actor_grad == ("reinforce" if discrete else "dynamics")
    assert isinstance(agent.world_model.rssm.img_in.norm, torch.nn.LayerNorm)  # plain GRU
    batch = synthetic_batch(2, 8, {"observation": (24,)}, 6, 64, 4, "cpu")
    before = [p.clone() for p in agent.actor.parameters()]
    for _ in range(2):  # Adam's first step moves every parameter that has a gradient
        out = agent.update(batch)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss_"))
    assert any((a != b).any() for a, b in zip(before, agent.actor.parameters()))


def test_tensordict_modules_keys():
    """World model, actor and critic as TensorDict modules with the documented keys."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dreamer_trl.modules import (
        actor_module,
        critic_module,
        slow_critic_module,
        world_model_module,
    )
    from pipelines.bench import synthetic_batch

    torch.manual_seed(0)
    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(ObsSpace({"observation": 24}, {}), 6, False, model, {})
    batch = synthetic_batch(2, 8, {"observation": (24,)}, 6, 64, 4, "cpu")
    out = world_model_module(agent.world_model)(batch)
    assert out.batch_size == (2, 8)
    assert out["posterior", "deter"].shape == (2, 8, 64)
    assert out["posterior", "stoch"].shape == out["prior", "logits"].shape == (2, 8, 32, 4)
    assert out["feat"].shape == (2, 8, 64 + 128)
    out = actor_module(agent.actor)(out)
    assert out["action"].shape == (2, 8, 6) and out["action_params"].shape == (2, 8, 12)
    value = critic_module(agent.critic)(out.clone())["state_value"]
    slow = slow_critic_module(agent.loss.slow_critic)(out.clone())["state_value"]
    assert value.shape == slow.shape == (2, 8)
    torch.testing.assert_close(value, slow)  # the slow critic starts as a copy
