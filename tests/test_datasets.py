"""Stored experience in and out: Minari datasets made by Minari's own DataCollector
(CartPole, Pendulum) and a run's replay become the reference's steps in a StepReplay;
offline updates lower the world-model loss; bad input is one line; `make dataset` writes
a Minari dataset that Minari loads and that round-trips to the run's steps."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

minari = pytest.importorskip("minari")
gym = pytest.importorskip("gymnasium")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny import MODEL  # noqa: E402

from dreamer_trl.agent import DreamerV3Agent  # noqa: E402
from dreamer_trl.datasets import (  # noqa: E402
    DATASET_STREAM,
    DatasetError,
    load_dataset,
)
from dreamer_trl.envs import make_env  # noqa: E402
from dreamer_trl.minari_export import validate_minari  # noqa: E402
from dreamer_trl.offline import heldout_loss, pretrain  # noqa: E402
from dreamer_trl.replay import StepReplay  # noqa: E402

TINY = MODEL
FAST = {"optim": {"lr": 1e-3, "warmup": 0}, "imag_dtype": "float32"}
# Minari asks for an eval env and an env spec; these test datasets need neither.
pytestmark = pytest.mark.filterwarnings("ignore:.*(eval_env|env_spec).*:UserWarning")
STEP_KEYS = ("observation", "action", "reward", "is_first", "is_last", "is_terminal")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    """MINARI_DATASETS_PATH for the module: a fresh dir, nothing of ~/.minari is read."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        yield root


def collect(dataset_id: str, env: gym.Env, episodes: int, seed: int, each_end: int = 0):
    """A Minari dataset of random-action episodes, written by Minari's DataCollector:
    ``episodes`` of them, and more until ``each_end`` have terminated and been truncated."""
    pytest.importorskip("jax", reason="Minari's DataCollector needs minari[create]")
    env = minari.DataCollector(env)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    ends = {"terminated": 0, "truncated": 0}
    while sum(ends.values()) < episodes or min(ends.values()) < each_end:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            ends["terminated" if term else "truncated"] += 1
            env.reset()
    return env.create_dataset(
        dataset_id,
        algorithm_name="random",
        author="tests",
        author_email="tests@example.org",
        code_permalink="tests/test_datasets.py",
        description="random actions",
    )


@pytest.fixture(scope="module")
def cartpole_ds(minari_root):
    """CartPole episodes cut at 15 steps: some terminate (the pole falls), some are
    truncated by the time limit."""
    env = gym.make("CartPole-v1", max_episode_steps=15)
    return collect("cartpole/random-v0", env, episodes=4, seed=0, each_end=2)


@pytest.fixture(scope="module")
def pendulum_ds(minari_root):
    return collect("pendulum/random-v0", gym.make("Pendulum-v1", max_episode_steps=20), 3, 1)


def agent_for(task: str, **algo) -> DreamerV3Agent:
    """The agent the trainer builds for the gym env ``task`` (tiny model)."""
    env = make_env({"suite": "gym", "task": task})
    torch.manual_seed(0)
    agent = DreamerV3Agent.from_specs(
        env.observation_spec, env.action_spec, TINY, {**FAST, **algo}
    )
    env.close()
    return agent


def new_replay(agent: DreamerV3Agent, capacity: int = 2000, **kwargs) -> StepReplay:
    return StepReplay(capacity, 4, 9, agent.obs_space.keys, storage="tensor", **kwargs)


def stored(replay: StepReplay):
    """Every stored step, in storage order."""
    return replay.buffer.storage[torch.arange(len(replay))]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# --------------------------------------------------------------------------- Minari in


def test_cartpole_steps_match_the_episodes(cartpole_ds):
    agent = agent_for("CartPole-v1")
    replay = new_replay(agent)
    info = load_dataset("cartpole/random-v0", agent, replay)
    episodes = list(cartpole_ds.iterate_episodes())
    assert info.kind == "minari" and info.episodes == len(episodes)
    assert info.steps == len(replay) == cartpole_ds.total_steps + len(episodes)
    rows, at = stored(replay), 0
    assert (rows["stream"] == DATASET_STREAM).all()
    assert torch.equal(rows["stream_step"], torch.arange(len(rows)))
    kinds = set()
    for ep in episodes:
        n = len(ep.rewards)
        steps = rows[at : at + n + 1]
        at += n + 1
        assert np.array_equal(steps["observation"].numpy(), ep.observations)
        # The reward that came with o_t: 0 at the reset, then the reward of a_{t-1}.
        assert steps["reward"][0] == 0
        assert np.allclose(steps["reward"][1:].numpy(), ep.rewards)
        # The action taken at o_t, one-hot; none at the final observation.
        assert torch.equal(steps["action"][:-1].argmax(-1), torch.as_tensor(ep.actions))
        assert (steps["action"][:-1].sum(-1) == 1).all() and (steps["action"][-1] == 0).all()
        first, last, terminal = (steps[k] for k in ("is_first", "is_last", "is_terminal"))
        assert first.tolist() == [True] + [False] * n
        assert last.tolist() == [False] * n + [True]
        # Termination only where the episode terminated; a time-limit end is no termination.
        assert terminal.tolist() == [False] * n + [bool(ep.terminations[-1])]
        kinds.add("terminated" if ep.terminations[-1] else "truncated")
    assert kinds == {"terminated", "truncated"}  # both kinds of end were exercised
    assert len(replay.queue) == 0  # sampled uniformly, not queued ahead of online data


def test_pendulum_actions_are_scaled_onto_the_agents_range(pendulum_ds):
    agent = agent_for("Pendulum-v1")
    replay = new_replay(agent)
    load_dataset("pendulum/random-v0", agent, replay)
    rows, at = stored(replay), 0
    for ep in pendulum_ds.iterate_episodes():
        n = len(ep.rewards)
        steps = rows[at : at + n + 1]
        at += n + 1
        # Box(-2, 2) → [-1, 1] as the env's ActionScaling maps it (a_env = 2·a).
        assert torch.allclose(steps["action"][:-1], torch.as_tensor(ep.actions) / 2)
        assert steps["action"][:-1].abs().max() <= 1
        assert not steps["is_terminal"].any()  # Pendulum only ever truncates
        assert steps["is_last"][-1] and steps["is_last"].sum() == 1


def test_queue_option_puts_the_dataset_in_the_online_queue(cartpole_ds):
    agent = agent_for("CartPole-v1")
    replay = new_replay(agent)
    info = load_dataset("cartpole/random-v0", agent, replay, queue=True)
    assert len(replay.queue) == info.steps // replay.seq_len


def test_offline_updates_lower_the_world_model_loss(cartpole_ds, minari_root):
    agent = agent_for("CartPole-v1")
    replay = new_replay(agent)
    load_dataset(minari_root / "cartpole" / "random-v0", agent, replay)  # by path
    log = []
    last = pretrain(agent, replay, 18, log_every=6, log=lambda n, m: log.append((n, m)))
    assert [n for n, _ in log] == [6, 12, 18] and last == log[-1][1]
    wm = [sum(m[f"loss_{k}"] for k in ("rec", "rew", "con", "dyn", "rep")) for _, m in log]
    assert wm[-1] < 0.8 * wm[0], wm
    # The replay context: trained posteriors were written back over the zero latents.
    assert stored(replay)["deter"].abs().sum() > 0


def test_heldout_loss_reads_without_training(cartpole_ds):
    agent = agent_for("CartPole-v1")
    replay = new_replay(agent, online=False)
    load_dataset("cartpole/random-v0", agent, replay)
    before = [p.clone() for p in agent.parameters()]
    latents = stored(replay)["deter"].clone()
    out = heldout_loss(agent, replay, batches=2)
    assert out["world_model"] == pytest.approx(
        sum(out[f"loss_{k}"] for k in ("rec", "rew", "con", "dyn", "rep"))
    )
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters()))
    assert torch.equal(latents, stored(replay)["deter"])


class Frames(gym.Env):
    """64x64 RGB noise frames, 3 actions, episodes of 12 steps: an image dataset's env."""

    observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.integers(0, 256, (64, 64, 3), dtype=np.uint8), {}

    def step(self, action):
        self.t += 1
        frame = self.np_random.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        return frame, float(action), False, self.t >= 12, {}


@pytest.mark.parametrize("kind", ["integer", "image"])
def test_integer_and_image_datasets_load_as_the_env_does_and_train(minari_root, kind):
    from dreamer_trl.datasets import open_dataset

    if kind == "integer":  # FrozenLake: a Discrete(16) cell index, as the gym env gives it
        env, key = gym.make("FrozenLake-v1", max_episode_steps=10), "observation"
        ds = collect("frozenlake/random-v0", env, episodes=4, seed=0)
        agent = agent_for("FrozenLake-v1")  # the agent the env itself builds
    else:
        ds, key = collect("frames/random-v0", Frames(), episodes=3, seed=0), "pixels"
        src = open_dataset("frames/random-v0")  # an agent for the dataset's own spaces
        torch.manual_seed(0)
        agent = DreamerV3Agent.from_specs(src.observation_spec, src.action_spec, TINY, FAST)
    replay = new_replay(agent)
    info = load_dataset(ds.spec.dataset_id, agent, replay)
    assert info.episodes == ds.total_episodes and info.steps == len(replay)
    first = next(ds.iterate_episodes())
    got = stored(replay)[key][: len(first.observations)]
    want = torch.as_tensor(first.observations)
    if kind == "integer":
        assert agent.obs_space.integers and got.dtype == torch.int64
        assert torch.equal(got.reshape(-1), want.long())
    else:
        assert agent.obs_space.images == {"pixels": (3, 64, 64)} and got.dtype == torch.uint8
        assert torch.equal(got, want.permute(0, 3, 1, 2))  # [T, H, W, C] -> [T, C, H, W]
    out = pretrain(agent, replay, 2)
    assert all(np.isfinite(v) for v in out.values()), out


# --------------------------------------------------------------------------- bad input


def test_spaces_that_do_not_fit_the_agent_are_one_line(pendulum_ds, cartpole_ds):
    cartpole = agent_for("CartPole-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset("pendulum/random-v0", cartpole, new_replay(cartpole))
    text = one_line(err)
    assert "observes observation float [3]" in text and "reads observation float [4]" in text
    assert "recorded on gymnasium env Pendulum-v1" in text  # the env to run on instead
    # Same observations, other actions: a CartPole dataset for a continuous-action agent.
    from torchrl.data import Bounded, Composite, Unbounded

    agent = DreamerV3Agent.from_specs(
        Composite(observation=Unbounded(shape=(4,))),
        Bounded(low=-1.0, high=1.0, shape=(1,)),
        TINY,
        FAST,
    )
    with pytest.raises(DatasetError) as err:
        load_dataset("cartpole/random-v0", agent, new_replay(agent))
    assert "discrete (2 choices)" in one_line(err) and "continuous [1]" in str(err.value)
    assert "recorded on gymnasium env CartPole-v1" in str(err.value)


def test_missing_dataset_is_one_line(minari_root, tmp_path, cartpole_ds):
    agent = agent_for("CartPole-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset("cartpole/nothing-v0", agent, new_replay(agent))
    text = one_line(err)
    assert "cartpole/nothing-v0" in text and "cartpole/random-v0" in text  # lists what exists
    (tmp_path / "some_dir").mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "some_dir", agent, new_replay(agent))
    assert "neither a Minari dataset" in one_line(err)


def test_empty_dataset_is_one_line(minari_root):
    space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    minari.create_dataset_from_buffers(
        "cartpole/empty-v0",
        [],
        observation_space=space,
        action_space=gym.spaces.Discrete(2),
        algorithm_name="none",
        author="tests",
        author_email="tests@example.org",
        code_permalink="tests",
        description="no episodes",
    )
    agent = agent_for("CartPole-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset("cartpole/empty-v0", agent, new_replay(agent))
    assert "is empty" in one_line(err)


@pytest.mark.parametrize("damage", ["hdf5", "metadata"])
def test_corrupt_file_is_one_line(cartpole_ds, minari_root, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(minari_root / "cartpole" / "random-v0", copy)
    name = "main_data.hdf5" if damage == "hdf5" else "metadata.json"
    target = copy / "data" / name
    target.write_bytes(target.read_bytes()[:40] + b"\x00garbage")
    agent = agent_for("CartPole-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset(copy, agent, new_replay(agent))
    assert "corrupt or unreadable" in one_line(err)


def test_a_dataset_larger_than_the_replay_is_one_line(cartpole_ds):
    agent = agent_for("CartPole-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset("cartpole/random-v0", agent, new_replay(agent, capacity=50))
    assert "replay.capacity >=" in one_line(err)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    """A run dir as the trainer writes it: a tiny Pendulum agent, 96 env steps collected
    (30-step episodes, the last unfinished), 2 updates (latents written back), saved."""
    from dreamer_trl.collection import make_collector, make_policy, stream_of
    from dreamer_trl.trainer import Trainer
    from pipelines.common import compose_config

    cfg = compose_config(
        [
            "env=pendulum",
            "env.max_episode_steps=30",
            *(f"model.{k}={v}" for k, v in TINY.items()),
            "train.total_steps=96",
            "train.train_start=32",
            "train.batch_size=2",
            "train.seq_len=8",
            "replay.capacity=1000",
            "threads=1",
            "device=cpu",
            "compile.policy=false",
            "compile.steps=false",
            "tracking.enabled=false",
        ]
    )
    run_dir = tmp_path_factory.mktemp("pendulum") / "run"
    trainer = Trainer(cfg, run_dir)
    collector = make_collector(cfg, make_policy(trainer.agent, trainer.action_spec), 0)
    for batch in collector:
        trainer.replay.extend(batch, stream=stream_of(batch))
        trainer.counters["env_steps"] += batch.numel()
        if trainer.counters["env_steps"] >= 96:
            break
    collector.shutdown()
    for _ in range(2):
        trainer.update()
    trainer.save()
    return run_dir, stored(trainer.replay)


@pytest.mark.parametrize("chunk", [4096, 7])  # one read, or many overlapping chunks
def test_a_runs_replay_loads_as_the_same_steps(pendulum_run, chunk, monkeypatch):
    from dreamer_trl.datasets import RunSource

    monkeypatch.setattr(RunSource, "chunk", chunk)
    run_dir, steps = pendulum_run
    agent = agent_for("Pendulum-v1")
    replay = new_replay(agent)
    info = load_dataset(run_dir, agent, replay)
    assert info.kind == "run" and info.episodes == 3
    got = stored(replay)
    n = len(got)
    assert n == len(steps) - 1  # the newest step (of an unfinished episode) has no successor
    for key in STEP_KEYS:
        assert torch.equal(got[key], steps[key][:n]), key
    # The stored (written-back) latents of every non-final step come along.
    root = ~got["is_last"]
    for key in ("deter", "stoch"):
        assert torch.equal(got[key][root], steps[key][:n][root]), key


@pytest.mark.parametrize("chunk", [4096, 7])
def test_every_kth_episode_is_held_out_whole(pendulum_run, chunk, monkeypatch):
    from dreamer_trl.datasets import RunSource

    monkeypatch.setattr(RunSource, "chunk", chunk)  # episodes cut across chunks, too
    run_dir, steps = pendulum_run
    agent = agent_for("Pendulum-v1")
    replay, held = new_replay(agent), new_replay(agent, online=False)
    info = load_dataset(run_dir, agent, replay, heldout=held, heldout_every=2)
    source = steps[: len(steps) - 1]  # the newest step has no successor (as above)
    number = torch.cumsum(source["is_first"].reshape(-1).long(), 0)  # episode of each step
    out = (number % 2 == 0) & (number > 0)
    assert set(number[out].tolist()) == {2, 4}  # the 2nd, and the unfinished 4th
    got, kept = stored(held), stored(replay)
    assert (info.heldout_steps, info.steps) == (len(got), len(kept)) == (out.sum(), (~out).sum())
    assert info.heldout_episodes == 2
    for key in STEP_KEYS:  # each part is the same steps, in order, nothing cut or joined
        assert torch.equal(got[key], source[key][out]), key
        assert torch.equal(kept[key], source[key][~out]), key
    # No posterior of this agent exists for held-out steps: the RSSM's initial state.
    assert (got["deter"] == 0).all() and (got["stoch"] == 0).all()
    assert not torch.equal(kept["deter"], torch.zeros_like(kept["deter"]))
    # train=False: the held-out part alone (a resumed run's replay holds the rest).
    again, held2 = new_replay(agent), new_replay(agent, online=False)
    load_dataset(run_dir, agent, again, heldout=held2, heldout_every=2, train=False)
    assert len(again) == 0 and torch.equal(stored(held2)["observation"], got["observation"])


@pytest.mark.parametrize("chunk", [4096, 7])
@pytest.mark.parametrize("k", [0, 2])
def test_shards_deal_out_the_training_episodes(pendulum_run, chunk, k, monkeypatch):
    from dreamer_trl.datasets import RunSource

    monkeypatch.setattr(RunSource, "chunk", chunk)
    run_dir, steps = pendulum_run
    source = steps[: len(steps) - 1]
    number = torch.cumsum(source["is_first"].reshape(-1).long(), 0)  # episodes 1..4
    agent = agent_for("Pendulum-v1")
    parts = []
    for rank in range(2):  # no held-out replay: the held-out episodes are dropped all the same
        replay = new_replay(agent)
        load_dataset(run_dir, agent, replay, heldout_every=k, shard=(rank, 2))
        parts.append(stored(replay))
    # Held out (k=2): episodes 2 and 4; the training episodes 1, 3 go one to each rank.
    # Without: 1..4 in turn, rank 0 first.
    expect = [{1, 3}, {2, 4}] if not k else [{1}, {3}]
    for part, episodes in zip(parts, expect):
        mask = torch.isin(number, torch.tensor(sorted(episodes)))
        for key in STEP_KEYS:
            assert torch.equal(part[key], source[key][mask]), key
    with pytest.raises(ValueError, match=r"shard=\(2, 2\) is invalid"):
        load_dataset(run_dir, agent, new_replay(agent), shard=(2, 2))


def test_the_deal_numbers_episodes_across_streams():
    from dreamer_trl.datasets import Deal

    deal, t = Deal(), torch.tensor
    # Stream 0 starts with a whole episode (numbers from 1), in two chunks; stream 1 with
    # the tail of one (episode 0): the numbering runs on over both, with no gaps.
    assert deal(0, t([1, 1, 2]), t([1, 1, 2])).tolist() == [0, 0, 1]
    assert deal(0, t([2, 3]), t([2, 3])).tolist() == [1, 2]
    assert deal(1, t([0, 0, 1, 2]), t([0, 0, 1, 2])).tolist() == [3, 3, 4, 5]
    assert deal(2, t([1]), t([1])).tolist() == [6]


def test_heldout_of_a_minari_dataset_takes_whole_episodes(cartpole_ds):
    agent = agent_for("CartPole-v1")
    replay, held = new_replay(agent), new_replay(agent, online=False)
    info = load_dataset("cartpole/random-v0", agent, replay, heldout=held, heldout_every=3)
    lengths = [len(ep.rewards) + 1 for ep in cartpole_ds.iterate_episodes()]
    assert info.heldout_episodes == len(lengths) // 3
    assert len(held) == sum(n for i, n in enumerate(lengths, 1) if i % 3 == 0)
    assert len(replay) == sum(lengths) - len(held)
    assert int(stored(held)["is_first"].sum()) == info.heldout_episodes
    with pytest.raises(ValueError, match="heldout_every=1 is invalid"):
        load_dataset("cartpole/random-v0", agent, new_replay(agent), heldout=held,
                     heldout_every=1)


def test_a_damaged_run_checkpoint_is_one_line(pendulum_run, tmp_path):
    import shutil

    run_dir, _ = pendulum_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    victim = next(p for p in (copy / "checkpoints").rglob("*.memmap") if p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    agent = agent_for("Pendulum-v1")
    with pytest.raises(DatasetError) as err:
        load_dataset(copy, agent, new_replay(agent))
    assert "fails its checksum" in one_line(err)


def test_a_run_with_an_empty_replay_is_one_line(pendulum_run, tmp_path):
    from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    state = load_checkpoint(find_checkpoint(pendulum_run[0]))
    agent = agent_for("Pendulum-v1")
    save_checkpoint(tmp_path / "run", state, replay_buffer=new_replay(agent))
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "run", agent, new_replay(agent))
    assert "is empty" in one_line(err)


def test_make_dataset_round_trips_through_minari(pendulum_run, tmp_path, monkeypatch):
    from pipelines import dataset as dataset_cli
    from pipelines.common import run_cli

    run_dir, steps = pendulum_run
    out = tmp_path / "datasets"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_cli(dataset_cli.main, [f"ckpt={run_dir}", f"out={out}", "id=tests/pend-v0"])
    assert code == 0, printed.getvalue()
    assert "3 episodes, 90 steps, 6 steps of unfinished episodes left out" in printed.getvalue()
    # Minari itself: found by id under its datasets root, spaces and steps consistent.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    ds = minari.load_dataset("tests/pend-v0")
    assert (ds.total_episodes, ds.total_steps) == (3, 90)
    assert ds.env_spec.id == "Pendulum-v1" and ds.env_spec.max_episode_steps == 30
    assert ds.action_space == gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    assert validate_minari(ds) is None
    for ep in ds.iterate_episodes():  # Minari's own per-step checks, as its DataCollector's
        assert all(ds.observation_space.contains(o) for o in ep.observations)
        assert all(ds.action_space.contains(a) for a in ep.actions)
    # Back in: the run's complete episodes, step for step (actions as the env took them).
    agent = agent_for("Pendulum-v1")
    replay = new_replay(agent)
    load_dataset("tests/pend-v0", agent, replay)
    got = stored(replay)
    want = steps[: len(got)]
    assert len(got) == 93 and want["is_last"][-1]
    for key in STEP_KEYS:
        expect = want[key].clamp(-1, 1) if key == "action" else want[key]
        assert torch.equal(got[key], expect), key
    # Exporting to a taken id is one line, and changes nothing.
    with pytest.raises(DatasetError) as err:
        from dreamer_trl.minari_export import export_minari

        export_minari(run_dir, out, "tests/pend-v0")
    assert "exists already" in one_line(err)


def test_make_dataset_target_and_its_errors(tmp_path):
    cmd = ["make", "-s", "-n", "dataset", "CKPT=runs/x", f"OUT={tmp_path}"]
    line = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"pipelines/dataset.py ckpt=runs/x out={tmp_path}" in line
    from pipelines import dataset as dataset_cli
    from pipelines.common import run_cli

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert run_cli(dataset_cli.main, [f"out={tmp_path}"]) == 2
        assert run_cli(dataset_cli.main, [f"ckpt={tmp_path / 'none'}", f"out={tmp_path}"]) == 2
    lines = errors.getvalue().splitlines()
    assert len(lines) == 2 and "ckpt= is required" in lines[0] and "no checkpoint" in lines[1]
