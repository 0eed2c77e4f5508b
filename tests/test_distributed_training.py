"""``make train NPROC=2``: two data-parallel ranks under torchrun train one agent, write one
run (rank 0's record, every rank's replay), and resume only with the same process count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensordict import TensorDict
from test_pipeline import TINY

from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint
from dreamer_trl.trainer import Trainer
from pipelines.common import compose_config

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = [
    "env=pendulum",
    *TINY,
    "train.total_steps=96",
    "train.checkpoint_every=48",
    "env.max_episode_steps=100",
]


def launch(cwd: Path, store: str, *argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    lead = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONUNBUFFERED="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(
        [*(lead or [sys.executable]), str(ROOT / "pipelines" / "train.py"), *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_run")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = launch(tmp, store, *ARGS, f"run_dir={tmp / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, store, proc


def state_of(ckpt_dir: Path) -> dict:
    return load_checkpoint(ckpt_dir, verify=False)


def differing(a: dict, b: dict) -> list[str]:
    """The agent state_dict entries (tensors; the rest is extra state) that differ."""
    assert a.keys() == b.keys()
    return [k for k, v in a.items() if torch.is_tensor(v) and not torch.equal(v, b[k])]


def test_two_ranks_write_one_run(two_rank_run):
    tmp, store, proc = two_rank_run
    run = tmp / "run"
    # Rank 0 alone prints: one run line, one finished line.
    assert proc.stdout.count("finished: 96 env steps") == 1, proc.stdout
    assert proc.stdout.count("run dir ") == 1
    for step in (48, 96):  # each rank's part of each checkpoint, at the same steps
        assert (run / "checkpoints" / f"step_{step}" / "state.pt").is_file()
        assert (run / "rank1" / "checkpoints" / f"step_{step}" / "state.pt").is_file()
    main, other = state_of(run / "checkpoints/step_96"), state_of(run / "rank1/checkpoints/step_96")
    assert main["meta"]["world_size"] == other["meta"]["world_size"] == 2
    # One agent: every weight, moment and statistic equal on both ranks after the updates.
    assert main["counters"]["updates"] == other["counters"]["updates"] > 0
    differ = differing(main["agent"], other["agent"])
    assert not differ, differ[:5]
    # Two data streams: each rank's replay holds its own envs' steps (other seeds).
    obs = [
        TensorDict.load_memmap(d / "checkpoints/step_96/replay/steps")["observation"][:96]
        for d in (run, run / "rank1")
    ]
    assert obs[0].shape == obs[1].shape == (96, 3)
    assert not torch.allclose(obs[0], obs[1])
    # One MLflow run, rank 0's, with the run's metrics.
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert client.get_metric_history(runs[0].info.run_id, "eval/return")


def test_resume_needs_the_same_process_count(two_rank_run):
    tmp, store, _ = two_rank_run
    proc = launch(tmp, store, f"resume={tmp / 'run'}", "train.total_steps=160", nproc=1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert err and "written by 2 data-parallel process(es), this run has 1" in err[-1]
    assert "NPROC=2" in err[-1]
    assert find_checkpoint(tmp / "run").name == "step_96"  # untouched


@pytest.mark.slow  # the first leg (test_two_ranks_write_one_run) covers the two-rank loop
def test_two_ranks_resume_together(two_rank_run):
    tmp, store, _ = two_rank_run
    proc = launch(tmp, store, f"resume={tmp / 'run'}", "train.total_steps=160")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "finished: 160 env steps" in proc.stdout
    run = tmp / "run"
    main = state_of(run / "checkpoints/step_160")
    other = state_of(run / "rank1/checkpoints/step_160")
    assert main["counters"]["updates"] == other["counters"]["updates"]
    assert not differing(main["agent"], other["agent"])


@pytest.mark.slow  # kills a rank mid-run; the classification itself is a fast test
def test_a_rank_that_dies_stops_the_job_with_one_line(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*ARGS, "train.total_steps=100000", f"run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONUNBUFFERED="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2",
           str(ROOT / "pipelines" / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "rank1" / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(1)
        os.kill(rank_pid(proc.pid, rank=1), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 0 lost a peer: another rank of the 2-process job died" in lines[0]
    assert "resume from" in lines[0] and "step_" in lines[0]
    assert "Connection reset by peer" not in err  # gloo's trace is in MLflow's error.txt


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker ``rank`` (its RANK environment variable)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher}")


@pytest.mark.slow  # a benchmark's plumbing: two spawned ranks, ~1 min
def test_ddp_bench_prints_and_writes_its_rows(tmp_path):
    out = tmp_path / "bench_ddp.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "bench_ddp.py"), "updates=1", "warmup=1",
         "batch=2", "seq=8", "compile_steps=false", f"out={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaling efficiency" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert rows["1 process"]["allreduce_ms"] == 0 and rows["2 ranks"]["allreduce_ms"] > 0
    assert rows["2 ranks"]["seqs_per_s"] > 0 and report["efficiency"] > 0


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A one-process run: 96 steps of 20-step episodes, 4 complete and 1 unfinished."""
    tmp = tmp_path_factory.mktemp("source")
    proc = launch(tmp, f"sqlite:///{tmp / 'mlflow.db'}", *ARGS, "env.max_episode_steps=20",
                  f"run_dir={tmp / 'run'}", nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run"


def test_two_ranks_train_offline_on_their_shares_of_a_dataset(source, tmp_path):
    """train.offline under torchrun: each rank trains on every 2nd training episode (its own
    replay), rank 0 alone validates on the held-out ones, and the ranks stay one agent."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "off"
    offline = [*ARGS, "train.offline=true", f"train.dataset={source}", "train.heldout_every=2",
               "train.total_updates=4", "train.log_every=2", "train.checkpoint_every=2",
               "train.eval_every=0", f"run_dir={run}"]
    proc = launch(tmp_path, store, *offline)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rank 0's share: 1 in 2 training episodes") == 1, proc.stdout
    assert proc.stdout.count(" heldout=") == 2  # rank 0's log lines, at updates 2 and 4
    main, other = state_of(run / "checkpoints/step_4"), state_of(run / "rank1/checkpoints/step_4")
    assert main["counters"]["updates"] == other["counters"]["updates"] == 4
    assert not differing(main["agent"], other["agent"])
    # Episodes 2 and 4 held out; of the training ones 1, 3 and the unfinished 5th, rank 0
    # holds 1 and 5, rank 1 holds 3: together the dataset's training steps, once each.
    dumps = (run / "checkpoints/step_4", run / "rank1/checkpoints/step_4")
    steps = [TensorDict.load_memmap(d / "replay/steps") for d in dumps]
    firsts = [int(s["is_first"][: c["counters"]["dataset_steps"]].sum())
              for s, c in zip(steps, (main, other))]
    assert firsts == [2, 1]
    one = Trainer(compose_config([*offline[:-1], f"run_dir={tmp_path / 'one'}"]), tmp_path / "one")
    one._load_stored_experience()  # one process: every training episode
    shares = main["counters"]["dataset_steps"], other["counters"]["dataset_steps"]
    assert sum(shares) == one.counters["dataset_steps"] and min(shares) > 0


@pytest.mark.slow  # the offline test above covers the split; this, pretraining on it
def test_two_ranks_pretrain_on_their_shares_then_collect(source, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "pre"
    proc = launch(tmp_path, store, *ARGS, f"train.dataset={source}", "train.pretrain=3",
                  "train.total_steps=48", f"run_dir={run}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    main = state_of(find_checkpoint(run))
    other = state_of(run / "rank1" / "checkpoints" / find_checkpoint(run).name)
    for state in (main, other):
        assert state["counters"]["pretrained"] == 3 and state["counters"]["env_steps"] == 48
    assert main["counters"]["updates"] == other["counters"]["updates"] > 3
    assert not differing(main["agent"], other["agent"])
    # No held-out episodes: rank 0 holds episodes 1, 3, 5 of the dataset, rank 1 episodes 2, 4.
    shares = [s["counters"]["dataset_steps"] for s in (main, other)]
    assert shares[0] > shares[1] > 0
