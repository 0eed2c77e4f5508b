"""``collector.envs=N``: N envs stepped as one batch per collector, each its own replay
stream (issue 16 item 1)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import tiny  # noqa: E402

from dreamer_trl.collection import env_streams  # noqa: E402
from dreamer_trl.tracking import Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer  # noqa: E402
from pipelines.common import ConfigError, compose_config  # noqa: E402


def stored_steps(trainer: Trainer) -> TensorDict:
    storage = trainer.replay.buffer.storage
    return storage[: len(storage)]


def check_streams(steps: TensorDict, streams: set[int]) -> None:
    """Each stream is a run of consecutive steps of one env: it opens with is_first, and
    every episode end (is_last) is followed by an is_first, and only then."""
    assert set(steps["stream"].tolist()) == streams
    for stream in streams:
        mine = steps[steps["stream"] == stream]
        mine = mine[mine["stream_step"].argsort()]
        assert mine["stream_step"].tolist() == list(range(len(mine)))
        first, last = mine["is_first"].reshape(-1), mine["is_last"].reshape(-1)
        assert first[0]
        assert torch.equal(first[1:], last[:-1]), f"stream {stream}: is_first != previous is_last"
    assert steps["is_last"].any(), "CartPole episodes end within the run: the check above bites"


def run(tmp_path: Path, *extra: str) -> Trainer:
    cfg = compose_config(tiny("cartpole", "train.total_steps=128", "train.train_ratio=2", *extra))
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.train(Tracker("batched", run_name="r", enabled=False))
    assert result["status"] == "FINISHED"
    return trainer


def test_four_envs_are_four_streams_with_their_own_episodes(tmp_path):
    trainer = run(tmp_path, "collector.envs=4")
    c = trainer.counters
    # The train ratio counts every env step: 128 steps at ratio 2 with B·T = 2·8.
    assert c["env_steps"] == 128 and c["updates"] > 0
    steps = stored_steps(trainer)
    check_streams(steps, {0, 1, 2, 3})
    # Every env got 32 of the 128 steps (plus one final step per finished episode).
    per_stream = torch.bincount(steps["stream"])
    ends = torch.bincount(steps["stream"][steps["is_last"].reshape(-1)], minlength=4)
    assert torch.equal(per_stream - ends, torch.full((4,), 32))
    # Distinct seeds: the envs' first observations differ.
    firsts = steps[steps["stream_step"] == 0]
    obs = firsts[firsts["stream"].argsort()]["observation"]
    assert len({tuple(o.tolist()) for o in obs}) == 4


@pytest.mark.slow  # two worker processes: ~40 s alone, ~2 min on a busy machine
def test_workers_times_envs(tmp_path):
    """Worker i's env j is stream i·envs + j: two workers of two envs make four streams."""
    trainer = run(tmp_path, "collector.envs=2", "collector.num_workers=2")
    check_streams(stored_steps(trainer), {0, 1, 2, 3})


def test_env_streams_splits_a_batch_by_its_stream_ids():
    one = TensorDict({"stream": torch.full((5,), 7)}, [5])
    assert [s for s, _ in env_streams(one)] == [7]
    many = TensorDict({"stream": torch.tensor([[4] * 3, [5] * 3])}, [2, 3])
    pairs = env_streams(many)
    assert [s for s, _ in pairs] == [4, 5] and all(td.shape == (3,) for _, td in pairs)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("collector.envs=0", "collector.envs=0 is invalid"),
        ("collector.envs=3", "multiple of collector.envs=3"),  # 16 frames per batch
    ],
)
def test_bad_env_counts_are_one_line(override, needle):
    with pytest.raises(ConfigError, match=needle):
        compose_config(["env=cartpole", override])


# --------------------------------------------------------------------------- device-native


def test_torchrl_pendulum_is_one_batched_env_with_the_gym_layout():
    from dreamer_trl.envs import make_env

    env = make_env({"suite": "torchrl", "task": "pendulum"}, seed=0, batch=4)
    assert env.batch_size == (4,)
    roll = env.rollout(205, break_when_any_done=False)
    obs = roll["observation"]
    assert obs.shape == (4, 205, 3) and obs.dtype == torch.float32
    # (cos θ, sin θ) on the unit circle, as gym's Pendulum-v1 observes the angle.
    assert torch.allclose(obs[..., 0] ** 2 + obs[..., 1] ** 2, torch.ones(4, 205))
    # gym's 200-step limit, a truncation for every env; no termination ever.
    truncated = roll["next", "truncated"].squeeze(-1)
    assert truncated[:, 199].all() and truncated.sum() == 4
    assert not roll["next", "terminated"].any()
    # The four envs start from their own random states.
    assert len({tuple(o.tolist()) for o in obs[:, 0]}) == 4


def test_torchrl_pendulum_partial_reset_keeps_the_other_envs():
    from dreamer_trl.envs import make_env

    env = make_env({"suite": "torchrl", "task": "pendulum"}, seed=0, batch=3)
    td = env.reset()
    td["_reset"] = torch.tensor([[True], [False], [False]])
    out = env.reset(td.clone(), set_state=False)
    assert not torch.equal(out["observation"][0], td["observation"][0])
    assert torch.equal(out["observation"][1:], td["observation"][1:])


def test_batch_is_refused_for_suites_that_build_one_env():
    from dreamer_trl.envs import make_env

    with pytest.raises(ValueError, match="batch=2: suite 'gym' builds one env"):
        make_env({"suite": "gym", "task": "CartPole-v1"}, batch=2)


def test_device_native_pendulum_trains_with_its_envs_as_streams(tmp_path):
    """The preset's envs (16, as one batched env on the collector's device) are 16 replay
    streams; eval runs an unbatched env of the same suite."""
    cfg = compose_config(tiny("torchrl_pendulum", "train.total_steps=256", "train.train_ratio=2"))
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.train(Tracker("native", run_name="r", enabled=False))["status"] == "FINISHED"
    assert trainer.counters["updates"] > 0
    steps = stored_steps(trainer)
    assert torch.equal(torch.bincount(steps["stream"]), torch.full((16,), 16))
    first = steps[steps["stream_step"] == 0]
    assert first["is_first"].all() and len(first) == 16
    assert len(trainer.returns) == 1  # the final eval ran


def test_bench_envs_measures_each_env_count(tmp_path):
    from pipelines import bench_envs

    out = tmp_path / "b.json"
    argv = ["envs=torchrl_pendulum", "counts=1,2", "steps=32", f"out={out}"]
    assert bench_envs.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["env"], r["envs"]) for r in rows] == [("torchrl_pendulum", n) for n in (1, 2)]
    assert all(r["env_steps_per_s"] > 0 for r in rows)
