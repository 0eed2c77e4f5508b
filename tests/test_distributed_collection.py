"""``collector.backend=distributed|rpc|ray``: env workers as TorchRL's remote collectors
(issue 16 item 4).

One remote collector (2 worker processes of 2 envs each) per backend serves the tests of
this module in file order; starting it is most of the module's time (two spawned processes
importing torch and torchrl), so the rpc one runs with the slow tests. The killed-worker
test is the last to use it: it kills a worker and shuts the collector down.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDictBase

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import tiny  # noqa: E402

from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from dreamer_trl.collection import (  # noqa: E402
    BACKENDS,
    env_streams,
    make_collector,
    make_policy,
    remote_collector,
)
from dreamer_trl.policy import ActingPolicy  # noqa: E402
from dreamer_trl.trainer import Trainer  # noqa: E402
from pipelines.common import ConfigError, compose_config  # noqa: E402

WORKERS, ENVS = 2, 2


def config(backend: str, workers: int = WORKERS, *extra: str):
    return compose_config(tiny(
        "pendulum", f"collector.backend={backend}", f"collector.num_workers={workers}",
        f"collector.envs={ENVS}", *extra,
    ))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the learner's loop polls in Python, so SIGALRM lands."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def acts_with(policy: ActingPolicy, batch: TensorDictBase) -> bool:
    """Whether ``batch`` was collected with ``policy``'s current weights: the RSSM's next
    deterministic state is a function of the step's inputs and the weights alone."""
    replay = policy(batch.select(*policy.in_keys).clone())
    return torch.allclose(replay["next", "deter"], batch["next", "deter"], atol=1e-5)


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# --------------------------------------------------------------------------- a training run


@pytest.mark.slow  # two worker processes and a training run: ~1 min alone, more when busy
@pytest.mark.parametrize("backend", ["distributed", "rpc"])
def test_training_on_remote_workers(tmp_path, backend):
    """train.py on remote workers finishes, and every worker's env steps reach replay as
    their own stream. In a process of its own: a second remote collector started in one
    process after another (the shared collectors below) can hang there."""
    run_dir = tmp_path / "run"
    argv = [*tiny("cartpole", f"collector.backend={backend}", "collector.num_workers=2",
                  "train.total_steps=160", "train.train_ratio=2"),
            "tracking.enabled=false", f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), *argv],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished: 160 env steps" in proc.stdout
    state = load_checkpoint(find_checkpoint(run_dir))
    assert state["counters"]["updates"] > 0
    streams = {int(k): int(v) for k, v in state["replay"]["stream_steps"].items()}
    assert set(streams) == {0, 1} and all(n > 0 for n in streams.values()), streams


@pytest.fixture(scope="module", params=["distributed", pytest.param("rpc", marks=pytest.mark.slow)])
def remote(request, tmp_path_factory):
    backend = request.param
    cfg = config(backend)
    trainer = Trainer(cfg, tmp_path_factory.mktemp(backend) / "run")
    policy = make_policy(trainer.agent, trainer.action_spec)
    with deadline(240):
        collector = make_collector(cfg, policy, seed=0)
    workers = SimpleNamespace(
        backend=backend, cfg=cfg, trainer=trainer, policy=policy, collector=collector,
        batches=iter(collector), jobs=list(collector.jobs),
    )
    yield workers
    collector.shutdown()


def test_batches_have_the_local_collectors_shape_and_stream_tags(remote):
    # The same config on the local backend, one in-process worker: the reference layout.
    local = make_collector(config("local", workers=1), remote.policy, seed=0)
    try:
        reference = next(iter(local))
    finally:
        local.shutdown()
    assert reference.shape == (ENVS, 8)  # [envs, frames_per_batch / envs]
    with deadline(120):
        batches = [next(remote.batches) for _ in range(4 * WORKERS)]
    streams = []
    for batch in batches:
        assert batch.shape == reference.shape
        assert set(batch.keys(True, True)) == set(reference.keys(True, True))
        streams.append(tuple(s for s, _ in env_streams(batch)))
    # Worker i's env j is stream i·envs + j, as with MultiAsyncCollector.
    assert set(streams) == {(0, 1), (2, 3)}
    # Each stream continues where its previous batch stopped (no episode ends this early).
    last = {}
    for batch in batches:
        for stream, steps in env_streams(batch):
            assert not steps["next", "done"].any()
            assert torch.equal(steps["observation"][1:], steps["next", "observation"][:-1])
            if stream in last:
                assert torch.equal(steps["observation"][0], last[stream])
            last[stream] = steps["next", "observation"][-1]


def after_push(remote, check) -> dict[int, list[bool]]:
    """Push the policy's weights, then ``check`` each worker's next 3 batches: worker ->
    results in order (a worker is keyed by its first stream, 0 or 2)."""
    remote.collector.update_policy_weights_()
    seen = {0: [], ENVS: []}
    with deadline(120):
        while min(len(v) for v in seen.values()) < 3:
            batch = next(remote.batches)
            seen[int(batch["stream"].min())].append(bool(check(batch)))
    return seen


def assert_taken(seen: dict[int, list[bool]]) -> None:
    """Async collection: a worker may hand over the batch it was collecting during the
    push (or one more, if it had just started the next); after that, only new ones."""
    for worker, fresh in seen.items():
        assert fresh[-1], f"the worker of stream {worker} never took the push: {fresh}"
        first = fresh.index(True)
        assert all(fresh[first:]) and first <= 2, f"the worker of stream {worker}: {fresh}"


def test_policy_weights_reach_the_workers(remote):
    policy = remote.policy
    with deadline(120):
        assert acts_with(policy, next(remote.batches))
        with torch.no_grad():
            for p in policy.world_model.rssm.parameters():
                p.mul_(1.5)
        assert not acts_with(policy, next(remote.batches))  # not pushed yet: the check bites
    assert_taken(after_push(remote, lambda batch: acts_with(policy, batch)))


def test_the_prefill_switch_reaches_the_workers(remote):
    """``policy.random`` is a buffer: the trainer turns it off after the random prefill and
    relies on the push to carry that. A planted actor acts near +1 (tanh(3) ± 0.1·noise);
    uniform random actions over the symmetric bounds are negative half of the time."""
    policy, out = remote.policy, remote.policy.actor.out
    with torch.no_grad():
        out.weight.zero_()
        out.bias[: policy.actor.action_dim] = 3.0  # mean tanh(3) = 0.995
        out.bias[policy.actor.action_dim :] = -20.0  # std at its minimum, 0.1
    policy.random = True
    assert_taken(after_push(remote, lambda batch: (batch["action"] < 0).any()))
    policy.random = False
    assert_taken(after_push(remote, lambda batch: (batch["action"] > 0.5).all()))


def test_a_killed_worker_fails_in_one_line_and_shutdown_stops_the_rest(remote):
    jobs = remote.jobs
    assert all(job.is_alive() for job in jobs)
    os.kill(jobs[0].pid, signal.SIGKILL)
    message = rf"^remote env worker 0 \(pid {jobs[0].pid}\) exited with code -9; its log is above$"
    with deadline(60), pytest.raises(RuntimeError, match=message):
        for _ in range(50):  # the kill lands asynchronously: a batch or two may still come
            next(remote.batches)
    with deadline(60):
        remote.collector.shutdown()
    assert all(gone(job.pid) for job in jobs), [job.pid for job in jobs if not gone(job.pid)]
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- refusals


def test_a_bad_backend_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as info:
        compose_config(["env=pendulum", "collector.backend=grpc"])
    text = str(info.value)
    assert "\n" not in text and "collector.backend=grpc" in text
    assert all(choice in text for choice in BACKENDS)
    # The library says the same to a caller that bypasses the config schema.
    with pytest.raises(ValueError, match=r"^collector.backend=grpc is invalid: must be one of "
                       r"local, distributed, rpc, ray$"):
        remote_collector("grpc", [], None, frames_per_batch=16, total_frames=-1)


def test_ray_absent_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    cfg = config("ray")
    trainer = Trainer(cfg, tmp_path / "run")
    policy = make_policy(trainer.agent, trainer.action_spec)
    with pytest.raises(RuntimeError, match=r"^collector.backend=ray needs ray, which is not "
                       r"installed \(pip install ray\); collector.backend=distributed"):
        make_collector(cfg, policy, seed=0)
