"""Suite ``brax`` (issue 16 item 2): Brax envs through TorchRL's ``BraxEnv``, natively
batched on a device, in the agent's layout. Brax compiles its physics with JAX on first use
(~40 s on this CPU), so the module builds one env and shares it."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("brax", reason="suite brax needs the brax extra")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import tiny  # noqa: E402

from dreamer_trl.envs import make_env  # noqa: E402
from dreamer_trl.tracking import Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer  # noqa: E402
from pipelines.common import compose_config  # noqa: E402

PENDULUM = {"suite": "brax", "task": "inverted_pendulum", "max_episode_steps": 6}


@pytest.fixture(scope="module")
def rollout():
    env = make_env(PENDULUM, seed=0, batch=4)
    return env, env.rollout(14, break_when_any_done=False)


def test_a_brax_env_is_one_batched_env_in_the_agents_layout(rollout):
    env, roll = rollout
    assert env.batch_size == (4,)
    obs = roll["observation"]
    assert obs.shape == (4, 14, 4) and obs.dtype == torch.float32
    spec = env.action_spec
    assert spec.shape == (4, 1) and (spec.space.low == -1).all() and (spec.space.high == 1).all()
    steps = roll["next", "step_count"].squeeze(-1)
    term, trunc, done = (roll["next", k].squeeze(-1) for k in ("terminated", "truncated", "done"))
    assert torch.equal(done, term | trunc)
    # The time limit truncates at step 6 and only there; the pole falling terminates.
    assert torch.equal(trunc, steps == 6) and trunc.any() and (term & ~trunc).any()
    # Every env that ended starts over at the next step, the others go on.
    after = roll["step_count"].squeeze(-1)[:, 1:]
    assert torch.equal(after == 0, done[:, :-1])
    assert len({tuple(o.tolist()) for o in obs[:, 0]}) == 4  # own start states


def test_bad_brax_tasks_are_one_line():
    with pytest.raises(ValueError, match="unknown brax task 'antt'; valid tasks: .*ant"):
        make_env({"suite": "brax", "task": "antt"})
    with pytest.raises(ValueError, match="from_pixels=True: suite 'brax'"):
        make_env({**PENDULUM, "from_pixels": True})


@pytest.mark.slow
def test_a_brax_env_trains_with_its_envs_as_streams(tmp_path):
    """The brax preset (16 envs as one batched env, here 4) through the trainer: each env
    its own replay stream; eval runs an unbatched env of the same suite."""
    cfg = compose_config(tiny("brax_ant", "env.task=inverted_pendulum", "collector.envs=4",
                              "train.total_steps=128", "train.train_ratio=4"))
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.train(Tracker("brax", run_name="r", enabled=False))["status"] == "FINISHED"
    assert trainer.counters["updates"] > 0 and len(trainer.returns) == 1
    storage = trainer.replay.buffer.storage
    steps = storage[: len(storage)]
    assert set(steps["stream"].tolist()) == {0, 1, 2, 3}
    assert steps["is_last"].any() and steps["is_terminal"].any()
