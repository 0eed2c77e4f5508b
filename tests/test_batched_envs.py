"""``collector.envs=N``: N envs stepped as one batch per collector, each its own replay
stream (issue 16 item 1)."""

import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import tiny  # noqa: E402

from dreamer_trl.tracking import Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer, env_streams  # noqa: E402
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
        assert last.any(), "tiny CartPole episodes end within the run"


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
