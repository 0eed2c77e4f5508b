"""The device path's CPU-checkable rules (issue 20): device errors, an eval failure that
loses no training, the acting policy's weights and its random actions without host syncs,
the matmul-precision knob, and a machine without git."""

from __future__ import annotations

import subprocess

import pytest
import torch
from test_pipeline import run_train, tiny
from torchrl.data import Bounded

from dreamer_trl import trainer as trainer_mod
from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint
from dreamer_trl.policy import random_where
from pipelines.common import ConfigError, compose_config


def test_a_device_index_that_does_not_exist_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device=cuda:2 does not exist: 2 CUDA device\(s\); "
                                         r"valid: cuda:0, cuda:1, cuda, cpu"):
        trainer_mod.resolve_device("cuda:2")
    assert trainer_mod.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_random_actions_are_selected_on_device():
    spec = Bounded(-2.0, 3.0, shape=(4,))
    action = torch.full((64, 4), 0.5)
    kept = random_where(torch.tensor(False), action, spec)
    assert torch.equal(kept, action)
    drawn = random_where(torch.tensor(True), action, spec)
    assert drawn.shape == action.shape and drawn.dtype == action.dtype
    assert (drawn >= -2).all() and (drawn <= 3).all()
    assert drawn.std() > 0.5  # uniform over [-2, 3] (std 1.44), not the policy's actions


def test_acting_policy_holds_only_what_acting_reads():
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.collection import make_policy
    from dreamer_trl.world_model import ObsSpace

    model = dict(deter=32, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(ObsSpace({"observation": 5}, {}), 2, False, model, {})
    policy = make_policy(agent, Bounded(-1.0, 1.0, shape=(2,)))
    keys = set(policy.state_dict())
    wm = agent.world_model
    want = {f"world_model.encoder.{k}" for k in wm.encoder.state_dict()}
    want |= {f"world_model.rssm.{k}" for k in wm.rssm.state_dict()}
    want |= {f"actor.{k}" for k in agent.actor.state_dict()} | {"_random"}
    assert keys == want
    # The same modules, not copies: the learner's updates reach the policy.
    assert policy.world_model.rssm is wm.rssm and policy.world_model.encoder is wm.encoder


def test_matmul_precision_and_prefetch_are_checked():
    with pytest.raises(ConfigError, match="matmul_precision.*highest, high, medium"):
        compose_config(["env=pendulum", "matmul_precision=fast"])
    with pytest.raises(ConfigError, match="replay.prefetch=sometimes is invalid: must be one "
                                          "of auto, always, never"):
        compose_config(["env=pendulum", "replay.prefetch=sometimes"])


def test_an_eval_failure_saves_the_training_first(tmp_path, capsys, monkeypatch):
    seen = {}

    def broken_eval(self, episodes, video=False):
        raise RuntimeError("eval env broke")

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", broken_eval)
    # Recorded, not applied: the test process keeps its precision.
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda v: seen.update(set=v))
    run_dir = tmp_path / "run"
    argv = [*tiny("pendulum"), "train.eval_every=48", "train.checkpoint_every=1000",
            "tracking.enabled=false", "matmul_precision=high", f"run_dir={run_dir}"]
    code, out = run_train(capsys, argv)
    assert code == 1  # the crash still ends the run, with its record
    assert "evaluation failed at step 48: training saved in" in out
    ckpt = find_checkpoint(run_dir)
    assert ckpt.name == "step_48"
    assert load_checkpoint(ckpt)["counters"]["updates"] > 0
    assert seen["set"] == "high"


def test_no_git_on_the_machine(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory: 'git'")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert trainer_mod._git_commit() == "unknown"


class _Replay:
    """Records the order of samples and write-backs (what update_step asks of a replay)."""

    def __init__(self):
        self.calls, self.n = [], 0

    def sample(self, device=None):
        from tensordict import TensorDict

        self.n += 1
        self.calls.append(f"sample{self.n}")
        return TensorDict({"id": torch.tensor(self.n)}, [])

    def write_back(self, batch, deter, stoch):
        self.calls.append(f"write_back{int(batch['id'])}")


class _Agent(torch.nn.Module):
    def __init__(self, replay):
        super().__init__()
        self.w, self.replay = torch.nn.Parameter(torch.zeros(())), replay

    def update(self, batch):
        from tensordict import TensorDict

        self.replay.calls.append(f"update{int(batch['id'])}")
        return TensorDict({"deter": torch.zeros(1), "stoch": torch.zeros(1)}, [])


def test_prefetch_draws_one_batch_ahead_within_a_burst():
    from dreamer_trl.learner import make_prefetch, update_step

    replay = _Replay()
    agent = _Agent(replay)
    assert make_prefetch("auto", replay, "cpu") is None  # nothing overlaps on a CPU
    prefetch = make_prefetch("always", replay, "cpu")
    for k in range(3):  # a burst of three updates, then (in the trainer) an extend
        update_step(agent, replay, "cpu", prefetch=prefetch, ahead=k < 2)
    # The reference's order: batch k+1 is drawn before batch k's write-back; the burst's
    # last update draws nothing, so no drawn batch waits across the extend.
    assert replay.calls == [
        "sample1", "update1", "sample2", "write_back1",
        "update2", "sample3", "write_back2",
        "update3", "write_back3",
    ]
    assert prefetch.ready is None
    with pytest.raises(ValueError, match="replay.prefetch=sometimes is invalid: one of auto"):
        make_prefetch("sometimes", replay, "cpu")


def test_a_run_with_prefetch_trains(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Ratio 4: four updates per collector batch, so three of them draw ahead.
    argv = [*tiny("pendulum"), "train.train_ratio=4", "replay.prefetch=always",
            "tracking.enabled=false", f"run_dir={run_dir}"]
    code, out = run_train(capsys, argv)
    assert code == 0, out
    state = load_checkpoint(find_checkpoint(run_dir))
    assert state["counters"]["updates"] >= 8
