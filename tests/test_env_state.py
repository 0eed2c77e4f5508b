"""A resumed run continues its envs' episodes (env_state.py): the simulator state and the
collector's carried step go into checkpoints, and come back into a new collector."""

import functools
import io
import sys
from pathlib import Path

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs import ParallelEnv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import tiny  # noqa: E402

from dreamer_trl.checkpoint import load_checkpoint  # noqa: E402
from dreamer_trl.collection import make_collector, make_policy  # noqa: E402
from dreamer_trl.env_state import acting_state, restore_acting  # noqa: E402
from dreamer_trl.envs import make_env  # noqa: E402
from dreamer_trl.tracking import Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer, make_agent  # noqa: E402
from pipelines.common import compose_config  # noqa: E402

CARRIED = ["action", ("next", "reward"), "step_count", "episode_reward", "deter", "stoch",
           "prev_action", "is_init"]


def collector_pair(env: str, *extra: str, second_parallel: bool | None = None):
    cfg = compose_config(tiny(env, "collector.frames_per_batch=8", *extra))
    probe = make_env(cfg.env, 0)
    policy = make_policy(make_agent(cfg, probe, torch.device("cpu")), probe.action_spec)
    probe.close()
    first = make_collector(cfg, policy, 0)
    if second_parallel is not None:
        cfg.collector.parallel = second_parallel
    # Other seeds: the second collector's envs start elsewhere until restored.
    return first, make_collector(cfg, policy, 123)


@pytest.mark.parametrize("env, envs, parallel, second_parallel", [
    ("dmc_cartpole", 1, False, None), ("dmc_cartpole", 2, False, None),
    ("cartpole", 2, False, None), ("atari_pong", 1, False, None), ("crafter", 1, False, None),
    # A ParallelEnv's workers hand over their envs' state; a SerialEnv's state goes into one.
    ("dmc_cartpole", 2, True, False), ("cartpole", 2, False, True),
])
def test_a_restored_collector_steps_on_exactly_as_the_saved_one(
    env, envs, parallel, second_parallel
):
    first, second = collector_pair(env, f"collector.envs={envs}",
                                   f"collector.parallel={str(parallel).lower()}",
                                   second_parallel=second_parallel)
    parallels = [parallel, parallel if second_parallel is None else second_parallel]
    assert [isinstance(c.env, ParallelEnv) for c in (first, second)] == parallels
    try:
        batches = iter(first)
        for _ in range(3):
            next(batches)
        state, why = acting_state(first)
        assert why == "" and len(state["envs"]) == envs
        buffer = io.BytesIO()  # through a checkpoint's serialisation, as a resume reads it
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
        torch.manual_seed(5)
        expected = next(batches)
        assert restore_acting(second, state) == ""
        torch.manual_seed(5)  # the policy samples: the same draws on both sides
        got = next(iter(second))
        obs = "pixels" if "pixels" in got.keys() else "observation"
        for key in [obs, ("next", obs), *CARRIED]:
            assert torch.equal(got[key], expected[key]), key
        if env == "dmc_cartpole":  # 1000-step episodes: on from 24 steps, not from a reset
            counts = got["step_count"].reshape(-1)
            assert (int(counts.min()), int(counts.max())) == (24 // envs, 32 // envs - 1)
            assert state["envs"][0]["step_count"] == 24 // envs
    finally:
        first.shutdown()
        second.shutdown()


def test_a_parallel_env_of_other_envs_says_why():
    """Only ActingEnvs answer the state call: another env's workers would die of it."""
    cfg = compose_config(tiny("cartpole"))
    collector = Collector(ParallelEnv(2, functools.partial(make_env, cfg.env, 0)), None,
                          frames_per_batch=8, total_frames=-1)
    try:
        next(iter(collector))
        state, why = acting_state(collector)
        assert state is None and "not ActingEnvs" in why
        assert next(iter(collector)).shape == (2, 4)  # its workers still step
    finally:
        collector.shutdown()


def test_a_natively_batched_pendulum_resumes_its_states_and_reset_draws():
    """TorchRL's PendulumEnv: 4 envs in one batched env, their θ, θ̇ in the carried step
    and the generator of their resets in the env. 5-step episodes: the batch after the
    restore resets every env, drawing the same initial states as the saved run."""
    first, second = collector_pair("torchrl_pendulum", "collector.envs=4",
                                   "env.max_episode_steps=5")
    try:
        batches = iter(first)
        for _ in range(2):
            next(batches)
        state, why = acting_state(first)
        assert why == "" and len(state["envs"]) == 1 and state["envs"][0]["suite"] == "torchrl"
        torch.manual_seed(5)
        expected = next(batches)
        assert restore_acting(second, state) == ""
        torch.manual_seed(5)
        got = next(iter(second))
        assert got["is_init"].any()  # a reset inside the batch: drawn by the restored rng
        for key in ["th", "thdot", "observation", ("next", "observation"), *CARRIED]:
            assert torch.equal(got[key], expected[key]), key
    finally:
        first.shutdown()
        second.shutdown()
    other, _ = collector_pair("torchrl_pendulum", "collector.envs=2")
    try:
        next(iter(other))
        assert "carried step has batch (4,), this run (2,)" in restore_acting(other, state)
    finally:
        other.shutdown()


def test_envs_whose_state_is_not_saved_say_why():
    first, second = collector_pair("cartpole", "env.task=InvertedPendulum-v5")
    try:
        next(iter(first))
        state, why = acting_state(first)
        assert state is None and "InvertedPendulumEnv is not saved" in why
        assert restore_acting(second, None).startswith("the checkpoint holds no env state")
        assert "format 0" in restore_acting(second, {"format": 0})
    finally:
        first.shutdown()
        second.shutdown()


def test_a_resumed_run_continues_its_episodes(tmp_path, capsys):
    """DMC cartpole episodes are 1000 steps: across a resume at 48 the streams go on
    without a new episode, their step counts continuing where they stood."""
    def run(steps: int, resume: bool) -> Trainer:
        cfg = compose_config(tiny("dmc_cartpole", "collector.envs=2",
                                  f"train.total_steps={steps}"))
        trainer = Trainer(cfg, tmp_path / "run")
        if resume:
            trainer.load(tmp_path / "run")
        assert trainer.train(Tracker("env_state", enabled=False))["status"] == "FINISHED"
        return trainer

    run(48, resume=False)
    saved = load_checkpoint(tmp_path / "run")["acting"]["carrier"]
    capsys.readouterr()
    trainer = run(96, resume=True)
    assert "envs continue their episodes from the checkpoint" in capsys.readouterr().out
    storage = trainer.replay.buffer.storage
    steps = storage[: len(storage)]
    for stream in (0, 1):
        mine = steps[steps["stream"] == stream]
        mine = mine[mine["stream_step"].argsort()]
        assert mine["stream_step"].tolist() == list(range(48))
        assert mine["is_first"].reshape(-1).nonzero().reshape(-1).tolist() == [0]
        # The first step after the resume is the saved carried step, not a reset.
        assert torch.equal(mine["observation"][24], saved["observation"][stream])
