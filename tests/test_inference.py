"""`dreamer_trl.load_policy`: tiny CartPole and Pendulum checkpoints trained by
`pipelines/train.py` act over gymnasium episodes; `act` equals `ActingPolicy` on the same
inputs and seed; observations as numpy or torch, single or batched, vector, pixel and dict;
bad input is one line; the README's "Using a trained agent" example runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, OneHot
from torchrl.envs.utils import ExplorationType, set_exploration_type

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamer_trl import ActingPolicy, DreamerV3Agent, load_policy  # noqa: E402
from dreamer_trl.checkpoint import CheckpointError  # noqa: E402
from dreamer_trl.envs import make_env  # noqa: E402
from dreamer_trl.inference import ActionSpace, Policy, PolicyState  # noqa: E402
from dreamer_trl.world_model import ObsSpace  # noqa: E402

TASKS = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1"}
SIZE = dict(deter=64, hidden=16, classes=4, units=16, depth=4)


@pytest.fixture(scope="module")
def runs(tiny_run) -> dict[str, Path]:
    return {env: tiny_run(env) for env in TASKS}


def one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


# --------------------------------------------------------------------------- episodes


@pytest.mark.parametrize("env", list(TASKS))
def test_act_over_a_gymnasium_episode(runs, env):
    policy = load_policy(runs[env])  # a run dir: its latest checkpoint
    assert policy.env_steps == 64 and policy.obs_keys == ["observation"]
    gym_env = gym.make(TASKS[env], max_episode_steps=60)  # Pendulum's 200 steps: 60 do
    for episode in range(2):
        obs, _ = gym_env.reset(seed=episode)
        state, done, steps = policy.initial_state(), False, 0
        while not done:
            action, state = policy.act(obs, state)  # float64 numpy straight from gym
            assert gym_env.action_space.contains(action), action
            obs, reward, terminated, truncated, _ = gym_env.step(action)
            done, steps = terminated or truncated, steps + 1
        assert steps >= 8
    assert isinstance(action, np.ndarray if env == "pendulum" else np.integer)
    assert not state.is_first.any() and state.deter.abs().sum() > 0


def test_checkpoint_dir_and_state_file(runs):
    ckpt = runs["cartpole"] / "checkpoints" / "step_64"
    obs = np.array([0.01, -0.02, 0.03, 0.0])
    actions = []
    for source in (ckpt, ckpt / "state.pt", str(runs["cartpole"])):
        policy = load_policy(source)
        torch.manual_seed(3)
        actions.append(policy.act(obs, policy.initial_state())[0])
    assert actions[0] == actions[1] == actions[2]
    assert "step_64" in repr(policy) and "discrete actions [2]" in repr(policy)


@pytest.mark.slow  # torch.compile of the acting step: ~30 s on 2 cores
def test_compiled_act_equals_eager(runs):
    eager, compiled = load_policy(runs["pendulum"]), load_policy(runs["pendulum"], compile=True)
    obs = np.random.default_rng(0).normal(size=(4, 3))
    results = []
    for policy in (eager, compiled):
        torch.manual_seed(3)
        state = policy.initial_state(4)
        for _ in range(3):
            action, state = policy.act(obs, state)
        results.append(action)
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


# --------------------------------------------------------------------------- = ActingPolicy


def acting_policy_steps(policy: Policy, spec, obs: torch.Tensor, first: torch.Tensor, greedy):
    """ActingPolicy over obs [T, B, F] with is_init ``first`` [T, B]: (actions, deters)."""
    acting = ActingPolicy(policy.world_model, policy.actor, spec, policy.obs_keys)
    b, rssm = obs.shape[1], policy.world_model.rssm
    carry = {  # the primer's zeros: is_init restarts them
        "deter": torch.zeros(b, rssm.deter),
        "stoch": torch.zeros(b, rssm.stoch, rssm.classes),
        "prev_action": torch.zeros(b, policy.actor.action_dim),
    }
    actions, deters = [], []
    mode = ExplorationType.DETERMINISTIC if greedy else ExplorationType.RANDOM
    with set_exploration_type(mode):
        for t in range(obs.shape[0]):
            td = TensorDict(
                {"observation": obs[t], "is_init": first[t, :, None], **carry}, batch_size=[b]
            )
            acting(td)
            carry = {k: td.get(("next", k)) for k in carry}
            actions.append(td.get("action"))
            deters.append(carry["deter"])
    return actions, deters


def check_same_as_acting_policy(policy: Policy, spec, greedy: bool, to_env=None) -> None:
    """Same seed, same inputs: the same latents and actions over 6 steps of 3 envs (env 1
    starting anew at step 3); ``to_env`` maps ActingPolicy's actions to the env's space."""
    g = torch.Generator().manual_seed(0)
    steps, batch, dim = 6, 3, policy.obs_space.vectors["observation"]
    obs = torch.randn(steps, batch, dim, generator=g)
    first = torch.zeros(steps, batch, dtype=torch.bool)
    first[0], first[3, 1] = True, True
    torch.manual_seed(11)
    want_actions, want_deters = acting_policy_steps(policy, spec, obs, first, greedy)
    torch.manual_seed(11)
    state = policy.initial_state(batch)
    for t in range(steps):
        state = policy.reset(state, first[t].numpy()) if t else state
        action, state = policy.act(obs[t], state, deterministic=greedy)
        torch.testing.assert_close(state.prev_action, want_actions[t], rtol=0, atol=1e-6)
        torch.testing.assert_close(state.deter, want_deters[t], rtol=0, atol=1e-6)
        if to_env is not None:
            expected = to_env(want_actions[t]).to(action.dtype)
            torch.testing.assert_close(action, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("env", list(TASKS))
def test_act_equals_acting_policy(runs, env, greedy):
    """Trained checkpoints; the actions mapped to the env's space as the training env's
    transforms map them (continuous: clip, then onto the bounds; discrete: one-hot → index)."""
    policy = load_policy(runs[env])
    torchrl_env = make_env({"suite": "gym", "task": TASKS[env]}, seed=0)

    def to_env(action: torch.Tensor) -> torch.Tensor:
        base = torchrl_env.transform.inv(TensorDict(action=action, batch_size=action.shape[:1]))
        return base.get("action").argmax(-1) if env == "cartpole" else base.get("action")

    check_same_as_acting_policy(policy, torchrl_env.action_spec, greedy, to_env)


@pytest.mark.parametrize("discrete", [True, False])
def test_act_equals_acting_policy_with_2023_options(discrete):
    """The 2023 code's RSSM and actor options (plain GRU, learned initial state, actor
    unimix), where a configuration has them."""
    algo = {"gru": "plain", "initial": "learned", "actor": {"unimix": 0.01}, "norm": "layer"}
    space = ObsSpace(vectors={"observation": 5}, images={})
    action = ActionSpace(True, 3) if discrete else ActionSpace(False, 2, (-1.0,) * 2, (1.0,) * 2)
    policy = in_memory_policy(space, action, algo=algo)
    assert getattr(policy.world_model.rssm, "plain", True)  # the option, where it exists
    spec = OneHot(3, dtype=torch.float32) if discrete else Bounded(-1.0, 1.0, shape=(2,))
    check_same_as_acting_policy(policy, spec, greedy=False)


# --------------------------------------------------------------------------- observations


def in_memory_policy(
    space: ObsSpace, action: ActionSpace, env: dict | None = None, algo: dict | None = None
) -> Policy:
    torch.manual_seed(0)
    algo = {"imag_dtype": "float32", **(algo or {})}
    agent = DreamerV3Agent(space, action.dim, action.discrete, SIZE, algo)
    return Policy(agent.world_model, agent.actor, space, action, {"env": env or {}})


def act_seeded(policy: Policy, obs, batch: int = 1, seed: int = 5, **kw):
    torch.manual_seed(seed)
    return policy.act(obs, policy.initial_state(batch), **kw)


def test_numpy_torch_single_and_batched(runs):
    policy = load_policy(runs["pendulum"])
    single = np.array([0.5, -0.5, 0.1])
    # Deterministic: a batch then draws the single one's latent noise in its first row.
    a_np, _ = act_seeded(policy, single, deterministic=True)
    a_t, _ = act_seeded(policy, torch.tensor(single, dtype=torch.float32), deterministic=True)
    a_b, s_b = act_seeded(policy, single[None].repeat(2, 0), batch=2, deterministic=True)
    assert isinstance(a_np, np.ndarray) and a_np.shape == (1,) and a_np.dtype == np.float32
    assert isinstance(a_t, torch.Tensor) and a_t.shape == (1,)
    assert a_b.shape == (2, 1) and s_b.deter.shape == (2, 64)
    np.testing.assert_allclose(a_np, a_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(a_np, a_b[0], atol=1e-6)
    assert -2.0 <= a_b.min() and a_b.max() <= 2.0  # Pendulum's torque bounds
    dict_action, _ = act_seeded(policy, {"observation": single}, deterministic=True)
    np.testing.assert_allclose(a_np, dict_action, atol=1e-6)


def test_pixel_and_dict_observations():
    """Images CHW or HWC, alone or beside a vector; equal to ActingPolicy on CHW."""
    space = ObsSpace(vectors={"observation": 5}, images={"pixels": (3, 64, 64)})
    policy = in_memory_policy(space, ActionSpace(False, 2, (-1.0, 0.0), (1.0, 4.0)))
    g = torch.Generator().manual_seed(1)
    chw = torch.randint(0, 256, (2, 3, 64, 64), generator=g).to(torch.uint8)
    vec = torch.randn(2, 5, generator=g)
    a_chw, s_chw = act_seeded(policy, {"pixels": chw, "observation": vec}, batch=2)
    a_hwc, s_hwc = act_seeded(
        policy, {"pixels": chw.permute(0, 2, 3, 1).numpy(), "observation": vec.numpy()}, batch=2
    )
    np.testing.assert_allclose(a_chw.numpy(), a_hwc, atol=1e-6)
    assert (a_hwc[:, 0] >= -1).all() and (a_hwc[:, 1] >= 0).all() and (a_hwc[:, 1] <= 4).all()
    single, _ = act_seeded(policy, {"pixels": chw[0], "observation": vec[0]})
    assert single.shape == (2,)

    spec = Bounded(-1.0, 1.0, shape=(2,))
    acting = ActingPolicy(policy.world_model, policy.actor, spec, policy.obs_keys)
    td = TensorDict(
        {"pixels": chw, "observation": vec, "is_init": torch.ones(2, 1, dtype=torch.bool)},
        batch_size=[2],
    )
    state = policy.initial_state(2)
    td.update({"deter": state.deter, "stoch": state.stoch, "prev_action": state.prev_action})
    torch.manual_seed(5)
    acting(td)
    torch.testing.assert_close(s_chw.prev_action, td.get(("next", "prev_action")))


def test_dm_control_observation_dict():
    """A dm_control observation dict is concatenated in sorted key order, like make_env."""
    space = ObsSpace(vectors={"observation": 5}, images={})
    box = ActionSpace(False, 2, (-1.0, -1.0), (1.0, 1.0))
    policy = in_memory_policy(space, box, {"suite": "dmc"})
    raw = {"velocity": np.array([0.3, 0.4]), "height": 1.2, "orientations": np.array([0.1, 0.2])}
    flat = np.array([1.2, 0.1, 0.2, 0.3, 0.4])  # height, orientations, velocity
    np.testing.assert_allclose(act_seeded(policy, raw)[0], act_seeded(policy, flat)[0])
    batched = {k: np.stack([np.asarray(v)] * 3) for k, v in raw.items()}
    batched["height"] = batched["height"].reshape(3, 1)
    assert act_seeded(policy, batched, batch=3)[0].shape == (3, 2)


def test_integer_observations():
    from dreamer_trl.world_model import IntVector

    space = ObsSpace(vectors={}, images={}, integers={"observation": IntVector((0, 1), (4, 3))})
    policy = in_memory_policy(space, ActionSpace(True, 4))
    action, _ = act_seeded(policy, np.array([3, 2]))
    assert isinstance(action, np.integer) and 0 <= action < 4
    with pytest.raises(ValueError) as err:
        act_seeded(policy, np.array([0.5, 1.0]))
    one_line(err, "'observation'", "float64", "integers")


def test_reset_marks_new_episodes(runs):
    policy = load_policy(runs["cartpole"])
    _, state = act_seeded(policy, np.zeros((3, 4)), batch=3)
    assert not state.is_first.any()
    state = policy.reset(state, np.array([False, True, False]))
    assert state.is_first.tolist() == [False, True, False]
    assert policy.reset(state).is_first.all()


# --------------------------------------------------------------------------- bad input


def test_bad_observation_and_state_are_one_line(runs):
    policy = load_policy(runs["cartpole"])
    state = policy.initial_state()
    cases = [
        (np.zeros(5), ("'observation'", "(5,)", "expected (4,) or (B, 4)")),
        (np.zeros((2, 2, 4)), ("'observation'", "(2, 2, 4)",)),
        (np.array(["a", "b", "c", "d"]), ("'observation'", "<U1", "expected numbers")),
        ({"pixels": np.zeros(4)}, ("missing ['observation']",)),
        (np.zeros((2, 4)), ("state is for a batch of 1", "batch of 2", "initial_state(batch=2)")),
    ]
    for obs, words in cases:
        with pytest.raises(ValueError) as err:
            policy.act(obs, state)
        one_line(err, *words)
    with pytest.raises(TypeError) as err:
        policy.act(np.zeros(4), {"deter": 0})
    one_line(err, "PolicyState", "dict")
    with pytest.raises(ValueError) as err:
        policy.initial_state(0)
    one_line(err, "batch=0")

    pixels = in_memory_policy(ObsSpace({}, {"pixels": (3, 64, 64)}), ActionSpace(True, 3))
    with pytest.raises(ValueError) as err:
        pixels.act(np.zeros((64, 64, 3), np.float32), pixels.initial_state())
    one_line(err, "'pixels'", "float32", "uint8")
    with pytest.raises(ValueError) as err:
        pixels.act(np.zeros((32, 32, 3), np.uint8), pixels.initial_state())
    one_line(err, "(32, 32, 3)", "(3, 64, 64)")


def test_wrong_checkpoint_kind_is_one_line(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"weights": torch.zeros(3), "step": 7}, other / "state.pt")
    with pytest.raises(CheckpointError) as err:
        load_policy(other)
    one_line(err, "is not a dreamer_trl checkpoint", "['step', 'weights']", "'agent'")
    onnx = tmp_path / "policy.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError) as err:
        load_policy(onnx)
    one_line(err, "policy.onnx is an ONNX export, not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_policy(tmp_path / "missing")
    one_line(err, "the path does not exist")


# --------------------------------------------------------------------------- README


def test_readme_example_runs(runs, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- using a trained agent -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 14
    code = code.replace("runs/cartpole/<run>", str(runs["cartpole"]))
    exec(compile(code, "README.md", "exec"), {})
    assert re.search(r"return \d+", capsys.readouterr().out)


def test_policy_state_namedtuple(runs):
    state = load_policy(runs["pendulum"]).initial_state(2)
    assert isinstance(state, PolicyState) and state._fields == (
        "deter",
        "stoch",
        "prev_action",
        "is_first",
    )
    assert state.stoch.shape == (2, 32, 4) and state.is_first.all()
