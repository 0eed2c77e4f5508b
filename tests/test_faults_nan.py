"""Non-finite guard (issue 15 item 6): a NaN injected into a real batch is caught on device.

Unit: ``agent.update`` on a batch with a NaN reward or observation records the update and
names its non-finite losses, skips it (weights, optimiser moments and the return normaliser
stay finite, so the next clean update is finite again), and a clean batch records nothing;
the update path calls nothing that would sync a device with the host.
Pipeline: a tiny CartPole run checkpoints, then gets NaN rewards from its replay; it stops
with one ``error:`` line naming the update and the losses, exits 3, marks the MLflow run
FAILED, and its latest checkpoint is the earlier finite one, which loads.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, Unbounded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny import MODEL  # noqa: E402

from dreamer_trl.agent import DreamerV3Agent  # noqa: E402
from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from dreamer_trl.functional import twohot_bins, twohot_nll  # noqa: E402
from dreamer_trl.replay import StepReplay  # noqa: E402
from pipelines import train  # noqa: E402
from pipelines.common import run_cli  # noqa: E402

TINY_MODEL = MODEL
LOSSES = ("rec", "rew", "con", "dyn", "rep", "policy", "value", "repval")
# Tensor methods that copy a value to the host (on a GPU: wait for the queued work).
SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


# --------------------------------------------------------------------------- unit


def tiny_agent(optim: dict | None = None) -> DreamerV3Agent:
    torch.manual_seed(0)
    obs = Composite(observation=Unbounded(shape=(24,)))
    act = Bounded(low=-1.0, high=1.0, shape=(6,))
    algo = {"optim": {"warmup": 0, **(optim or {})}}  # warmup 0: every update moves weights
    return DreamerV3Agent.from_specs(obs, act, TINY_MODEL, algo)


def batch_for(agent: DreamerV3Agent, b: int = 2, t1: int = 9, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    rssm = agent.world_model.rssm
    first = torch.zeros(b, t1, dtype=torch.bool)
    first[:, 0] = True
    return TensorDict(
        {
            "observation": torch.randn(b, t1, 24, generator=g),
            "action": 2 * torch.rand(b, t1, agent.action_dim, generator=g) - 1,
            "reward": torch.randn(b, t1, generator=g),
            "is_first": first,
            "is_last": torch.zeros(b, t1, dtype=torch.bool),
            "is_terminal": torch.zeros(b, t1, dtype=torch.bool),
            "deter": torch.zeros(b, t1, rssm.deter),
            "stoch": torch.zeros(b, t1, rssm.stoch, rssm.classes),
        },
        [b, t1],
    )


def with_nan(batch: TensorDict, key: str, index: tuple) -> TensorDict:
    bad = batch.clone()
    bad[key][index] = float("nan")
    return bad


def all_finite(agent: DreamerV3Agent) -> bool:
    tensors = [*agent.parameters(), *agent.buffers()]
    tensors += [v for s in agent.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return all(torch.isfinite(x).all() for x in tensors if x.is_floating_point())


def test_clean_update_records_nothing_on_device_without_host_syncs(monkeypatch):
    agent = tiny_agent()
    batch = batch_for(agent)
    agent.update(batch)  # first update: the guard's record is created
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    out = agent.update(batch)
    monkeypatch.undo()
    assert calls == []  # the guard queues device ops only; the trainer reads it at log time
    device = next(agent.parameters()).device
    assert all(torch.is_tensor(x) and x.device == device for x in agent.guard.state)
    assert agent.optimizer.last_grads_finite.device == device
    assert agent.guard.read() is None
    assert all(torch.isfinite(out[f"loss_{k}"]) for k in LOSSES)


def test_nan_reward_is_recorded_named_and_skipped():
    agent = tiny_agent()
    batch = batch_for(agent)
    agent.update(batch)
    weights = [p.detach().clone() for p in agent.parameters()]
    out = agent.update(with_nan(batch, "reward", (0, 3)))
    assert math.isnan(out["loss_rew"]) and math.isnan(out["loss_repval"])
    found = agent.guard.read()
    assert found is not None
    assert (found.index, found.recorded, found.bad) == (1, 2, 1)
    assert found.losses == ("loss_rew", "loss_repval") and found.gradients
    assert found.what() == "loss_rew, loss_repval, gradients"
    # skipped: nothing non-finite reached weights, moments or the return normaliser, and the
    # weights moved only by the (finite) decayed momentum
    assert all_finite(agent)
    assert any(not torch.equal(p, w) for p, w in zip(agent.parameters(), weights))
    out = agent.update(batch)
    assert all(torch.isfinite(out[f"loss_{k}"]) for k in LOSSES)
    found = agent.guard.read()
    assert (found.index, found.recorded, found.bad) == (1, 3, 1)  # the first bad one is kept


def test_nan_observation_names_every_loss():
    agent = tiny_agent()
    agent.update(with_nan(batch_for(agent), "observation", (1, 4, 2)))
    found = agent.guard.read()
    assert found.index == 0 and found.losses == tuple(f"loss_{k}" for k in LOSSES)
    assert all_finite(agent)


def test_adam_drops_nan_gradients_too():
    agent = tiny_agent({"name": "adam"})
    batch = batch_for(agent)
    agent.update(batch)
    agent.update(with_nan(batch, "reward", (1, 5)))
    found = agent.guard.read()
    assert found.index == 1 and "loss_rew" in found.losses and found.gradients
    assert all_finite(agent)


def test_twohot_nan_target_gives_nan_not_the_top_bin():
    """searchsorted puts a NaN past the last bin; the loss must stay NaN, not be finite."""
    bins = twohot_bins(255)
    logp = torch.log_softmax(torch.randn(3, 255), -1)
    loss = twohot_nll(logp, torch.tensor([0.5, float("nan"), float("inf")]), bins)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
    assert torch.isfinite(loss[2])  # beyond the outermost bin: all weight on it, as documented


# --------------------------------------------------------------------------- pipeline

TINY_RUN = [
    "env=cartpole",
    "model.deter=64",
    "model.hidden=16",
    "model.units=16",
    "model.classes=4",
    "model.depth=2",
    "train.total_steps=160",
    "train.train_start=32",
    "train.random_steps=32",
    "train.batch_size=2",
    "train.seq_len=8",
    "train.train_ratio=1",  # 16 env steps per collector batch -> 1 update per batch, from 32
    "train.eval_every=0",
    "train.eval_episodes=1",
    "train.keep_checkpoints=5",
    "train.progress=false",
    "replay.capacity=1000",
    "threads=1",
    "device=cpu",
    "compile.policy=false",
    "compile.steps=false",
]
POISON_FROM = 3  # the replay's 3rd sample (update 3, at env step 64) onwards holds a NaN


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """train.main turns SIGTERM into KeyboardInterrupt for the whole process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create it (migrations) once
    return uri


@pytest.fixture
def poisoned_replay(monkeypatch) -> dict:
    """NaN rewards in every replay sample from the POISON_FROM-th on (the data path a real
    NaN would take: replay → batch → loss → gradients)."""
    seen = {"samples": 0}
    sample = StepReplay.sample

    def nan_sample(self, device=None):
        batch = sample(self, device)
        seen["samples"] += 1
        if seen["samples"] >= POISON_FROM:
            reward = batch.get("reward").clone()
            reward[:, 3] = float("nan")
            batch.set("reward", reward)
        return batch

    monkeypatch.setattr(StepReplay, "sample", nan_sample)
    return seen


@pytest.mark.parametrize(
    "read_at, overrides, finite_step",
    [
        # log every 16 steps: found at the log line of step 64, before its checkpoint
        ("log", ["train.log_every=16", "train.checkpoint_every=32"], 32),
        # no log line within the run: found right before the checkpoint of step 64
        ("checkpoint", ["train.log_every=1000", "train.checkpoint_every=16"], 48),
    ],
)
def test_nan_run_stops_unsaved_with_the_finite_checkpoint_latest(
    read_at, overrides, finite_step, tmp_path, store, monkeypatch, capsys, poisoned_replay
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = run_cli(train.main, [*TINY_RUN, *overrides, f"run_dir={run_dir}"])
    out, err = capsys.readouterr()
    sys.stdout.write(out)
    sys.stderr.write(err)

    assert code == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    latest = run_dir / "checkpoints" / f"step_{finite_step}"
    assert errors == [
        f"error: non-finite update {POISON_FROM} (loss_rew, loss_repval, gradients; 1 of this "
        f"process's {POISON_FROM} updates non-finite): run stopped without saving it, "
        f"latest checkpoint {latest}"
    ]
    assert poisoned_replay["samples"] == POISON_FROM  # stopped at the first read after it
    assert find_checkpoint(run_dir) == latest
    assert not (run_dir / "checkpoints" / "step_64").exists()
    state = load_checkpoint(latest)
    assert state["counters"]["updates"] == finite_step // 16 - 1  # updates from step 32 on
    weights = [v for v in state["agent"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)
    run_id = next(
        line.split(" | ")[1].split()[-1] for line in out.splitlines() if "mlflow run" in line
    )
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "FAILED"
