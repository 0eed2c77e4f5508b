"""`pipelines/train.py` end to end, through its real entry point: tiny smoke runs on every env
config (MLflow params / metrics / artifacts, checkpoint on disk, eval video), resume (counters,
replay, optimizer state, same MLflow run, saved overrides), Ctrl-C / SIGTERM in a subprocess
(exit 130 and a loadable checkpoint), one-line exit-2 errors for bad input, and `make -n train`.

Every run is tiny (size1m shrunk to ~40k params, 64 env steps, 3 updates) and lives in tmp
dirs: the cwd is a tmp dir and ``MLFLOW_TRACKING_URI`` points at one sqlite store shared by the
module (creating a new store runs MLflow's migrations, several seconds each time).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "pipelines" / "train.py"
sys.path.insert(0, str(ROOT))

from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from dreamer_trl.trainer import Trainer, config_params  # noqa: E402
from pipelines import train  # noqa: E402
from pipelines.common import group_options, run_cli  # noqa: E402

TINY = [
    "model.deter=64",
    "model.hidden=16",
    "model.units=16",
    "model.classes=4",
    "model.depth=2",
    "train.total_steps=64",
    "train.train_start=32",
    "train.random_steps=32",
    "train.batch_size=2",
    "train.seq_len=8",
    "train.train_ratio=1",  # 16 env steps per collector batch -> 1 update per batch
    "train.log_every=16",
    "train.eval_episodes=1",
    "train.progress=false",
    "replay.capacity=1000",
    "threads=1",
    "device=cpu",
    "compile.policy=false",  # compiling the acting step costs ~30 s a process (a slow test below)
    "compile.steps=false",  # likewise the RSSM steps (tests/test_compile.py checks them)
    "tracking.log_model=false",  # each finished run's ONNX export: ~15 s (test_export.py)
]
# Eval episodes (and so eval videos) capped by the env's step limit: pendulum runs 200 steps,
# DMC 1000 and Pong ~800 (each rendered for the video), which would dominate the budget.
EPISODE_CAP = 100
RUN_LINE = re.compile(r"^run dir (?P<dir>.+) \| mlflow run (?P<id>\w+) \|", re.M)
LOSSES = ("loss_rec", "loss_rew", "loss_con", "loss_dyn", "loss_rep", "loss_policy", "loss_value")


def tiny(env: str, *extra: str) -> list[str]:
    cap = [] if env == "cartpole" else [f"env.max_episode_steps={EPISODE_CAP}"]
    if env.startswith("dmc"):
        # The DMC presets step 16 envs; 64 tiny steps over 16 streams give none the T+1 steps
        # an update samples. Two envs keep the batched path and let the tiny run train.
        cap.append("collector.envs=2")
    return [f"env={env}", *TINY, *cap, *extra]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two torch threads on a busy 2-core machine are pathologically slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """train.main turns SIGTERM into KeyboardInterrupt for the whole process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (its artifacts land in mlruns/ beside it)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create it (migrations) once
    return uri


@pytest.fixture
def workdir(tmp_path, store, monkeypatch) -> Path:
    """cwd = tmp_path (nothing lands in the repo); MLflow tracks into the module store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Spy:
    """Snapshots of the Trainer right after each ``load`` and at each ``save``."""

    def __init__(self, monkeypatch):
        self.loads: list[dict] = []
        self.saves: list[dict] = []
        load, save = Trainer.load, Trainer.save

        def spy_load(trainer, path):
            load(trainer, path)
            self.loads.append(self.snapshot(trainer))

        def spy_save(trainer):
            self.saves.append(self.snapshot(trainer))
            return save(trainer)

        monkeypatch.setattr(Trainer, "load", spy_load)
        monkeypatch.setattr(Trainer, "save", spy_save)

    @staticmethod
    def snapshot(trainer) -> dict:
        return {
            **trainer.counters,
            "replay": len(trainer.replay),
            "stream_steps": dict(trainer.replay.stream_steps),
            "opt_steps": [g.get("step", 0) for g in trainer.agent.optimizer.param_groups],
            "mlflow_run_id": trainer.mlflow_run_id,
            "last_return": trainer.last_return,
        }


def run_train(capsys, argv: list[str]) -> tuple[int, str]:
    """``train.main`` through ``run_cli`` as the script runs it: (exit code, stdout)."""
    capsys.readouterr()
    code = run_cli(train.main, argv)
    out, err = capsys.readouterr()
    sys.stdout.write(out)  # keep the run's output visible in a failure report
    sys.stderr.write(err)
    return code, out


def run_id_of(out: str) -> str:
    match = RUN_LINE.search(out)
    assert match, f"no 'run dir … | mlflow run …' line in:\n{out}"
    return match["id"]


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run dir (mtimes kept) that a test may damage without harming others."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every file below ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory, store) -> tuple[Path, str]:
    """A finished tiny tracked cartpole run: (run dir, MLflow run id). Read only."""
    tmp = tmp_path_factory.mktemp("cartpole")
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.chdir(tmp)
        handler = signal.getsignal(signal.SIGTERM)
        try:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = run_cli(train.main, [*tiny("cartpole"), f"run_dir={run_dir}"])
        finally:
            signal.signal(signal.SIGTERM, handler)
    assert code == 0, out.getvalue()
    return run_dir, run_id_of(out.getvalue())


# --------------------------------------------------------------------------- smoke runs


def check_finished_run(store: str, env: str, run_dir: Path, run_id: str) -> None:
    """What a finished 64-step run must leave on disk and in MLflow."""
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == env
    assert run.info.run_name == run_dir.name

    # Params: the whole flattened config, as saved in the run dir.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert run.data.params == config_params(cfg)
    params = run.data.params
    assert params["env.name"] == env and params["model.name"] == "size1m"
    assert params["model.deter"] == "64" and params["train.total_steps"] == "64"

    # Metrics: losses from the 3 updates, perf every 16 steps, one eval at the end.
    metrics = run.data.metrics
    for key in [f"train/{k}" for k in LOSSES] + ["eval/return", "eval/length", "perf/fps"]:
        assert key in metrics and math.isfinite(metrics[key]), (key, sorted(metrics))
    assert metrics["perf/fps"] > 0 and metrics["perf/updates"] == 3
    assert metrics["perf/replay"] == 64 + metrics["perf/episodes"]  # + each episode's last step

    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, key)]

    assert steps("perf/fps") == [16, 32, 48, 64]
    assert steps("train/loss_rec") == [32, 48, 64]  # updates start at train_start=32
    assert steps("eval/return") == [64]
    # Timed phases: where each interval's wall time went, per env step.
    assert steps("perf/sec_per_step/collect") == [16, 32, 48, 64]
    assert steps("perf/sec_per_step/update") == [32, 48, 64]
    phases = {k: v for k, v in metrics.items() if k.startswith("perf/sec_per_step/")}
    assert {"collect", "extend", "sample", "update", "write_back"} <= {
        k.rsplit("/", 1)[-1] for k in phases
    }, phases
    assert all(v > 0 for v in phases.values()), phases
    if env != "cartpole":
        assert metrics["eval/length"] <= EPISODE_CAP

    # The checkpoint on disk.
    ckpt = find_checkpoint(run_dir)
    assert ckpt == run_dir / "checkpoints" / "step_64"
    assert (ckpt / "state.pt").is_file() and (ckpt / "meta.json").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 64 and meta["counters"]["env_steps"] == 64
    assert meta["counters"]["updates"] == 3 and meta["replay"] == "saved"
    assert meta["meta"]["model"] == "size1m" and meta["meta"]["env"] == env
    state = load_checkpoint(ckpt)
    assert state["mlflow_run_id"] == run_id

    # Artifacts: the eval video (reset frame + one per step, 128×128 renders) and the rest.
    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"eval_video.mp4", "config.yaml", "learning_curve.png", "checkpoints"} <= top, top
    # Pixel envs also get the world model's open-loop prediction video.
    assert ("openloop.mp4" in top) == (env in ("dmc_walker_vision", "atari_pong")), top
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == [
        "checkpoints/meta.json"
    ]
    video = client.download_artifacts(run_id, "eval_video.mp4", str(run_dir.parent))
    with imageio.get_reader(video, format="FFMPEG") as reader:
        frames = np.stack(list(reader.iter_data()))
    assert frames.shape == (int(metrics["eval/length"]) + 1, 128, 128, 3), frames.shape
    assert frames.std() > 0


def test_smoke_cartpole(cartpole_run, store):
    run_dir, run_id = cartpole_run
    check_finished_run(store, "cartpole", run_dir, run_id)


@pytest.mark.parametrize(
    "env",
    [
        "pendulum",
        "dmc_walker",
        "dmc_walker_vision",  # 64×64 EGL renders: the slowest smoke run, still < 25 s
        "atari_pong",
    ],
)
def test_smoke(env, workdir, store, capsys):
    run_dir = workdir / "run"
    code, out = run_train(capsys, [*tiny(env), f"run_dir={run_dir}"])
    assert code == 0
    check_finished_run(store, env, run_dir, run_id_of(out))
    obs_keys = load_checkpoint(find_checkpoint(run_dir))["meta"]["obs_keys"]
    assert obs_keys == (
        ["pixels"] if env in ("dmc_walker_vision", "atari_pong") else ["observation"]
    )


@pytest.mark.slow  # torch.compile of the acting step: ~30 s on CPU before the first action
def test_smoke_compiled_policy(workdir, store, capsys):
    """The default config compiles the acting step (compile.policy=true)."""
    run_dir = workdir / "run"
    argv = [a for a in tiny("cartpole") if a != "compile.policy=false"]
    code, out = run_train(capsys, [*argv, f"run_dir={run_dir}"])
    assert code == 0
    assert OmegaConf.load(run_dir / "config.yaml").compile.policy is True
    check_finished_run(store, "cartpole", run_dir, run_id_of(out))


# --------------------------------------------------------------------------- resume


def run_ids(client: MlflowClient, experiment_id: str) -> set[str]:
    return {r.info.run_id for r in client.search_runs([experiment_id], max_results=1000)}


def test_resume_continues_counters_replay_optimizer_and_mlflow_run(
    workdir, store, capsys, monkeypatch
):
    spy = Spy(monkeypatch)
    run_dir = workdir / "run"
    code, out = run_train(
        capsys, [*tiny("cartpole"), "train.checkpoint_every=32", f"run_dir={run_dir}"]
    )
    assert code == 0
    run_id = run_id_of(out)
    saved = spy.saves[-1]
    # The periodic checkpoint at 32, then the final one at 64 (no second save at 64).
    assert [s["env_steps"] for s in spy.saves] == [32, 64]
    assert saved["env_steps"] == 64 and saved["updates"] == 3
    assert saved["replay"] == 64 + saved["episodes"]  # replay holds each episode's last step too
    assert saved["opt_steps"] == [3]  # LaProp's per-group step counter
    assert saved["mlflow_run_id"] == run_id
    overrides = (run_dir / "overrides.txt").read_text()
    assert overrides.split() == [
        *tiny("cartpole"),
        "train.checkpoint_every=32",
        f"run_dir={run_dir}",
    ]

    client = MlflowClient(tracking_uri=store)
    runs_before = run_ids(client, client.get_run(run_id).info.experiment_id)
    assert run_id in runs_before

    # Only resume= and a longer budget: everything else must come from the run dir.
    code, out = run_train(capsys, [f"resume={run_dir}", "train.total_steps=96"])
    assert code == 0
    assert f"resumed {run_dir} at env step 64" in out
    assert run_id_of(out) == run_id  # the same MLflow run, not a new one

    (loaded,) = spy.loads
    for key in ("env_steps", "updates", "episodes", "replay", "stream_steps", "opt_steps",
                "last_return"):
        assert loaded[key] == saved[key], key
    assert saved["episodes"] > 0 and math.isfinite(saved["last_return"])  # one had ended
    assert loaded["mlflow_run_id"] == run_id
    final = spy.saves[-1]
    assert final["env_steps"] == 96 and final["replay"] == 96 + final["episodes"]
    assert final["updates"] == saved["updates"] + 2  # batches at 80 and 96
    assert final["opt_steps"] == [saved["opt_steps"][0] + 2]

    # The run dir: the saved overrides reused (the tiny model), the new budget applied and
    # kept, so that a later plain resume trains to 96 too.
    assert "train.total_steps=64" in overrides.split()
    assert (run_dir / "overrides.txt").read_text().split() == [
        *(o for o in overrides.split() if o != "train.total_steps=64"),
        "train.total_steps=96",
    ]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.model.deter == 64 and cfg.train.checkpoint_every == 32
    assert cfg.train.total_steps == 96
    ckpt = find_checkpoint(run_dir)
    assert ckpt.name == "step_96"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_64",
        "step_96",  # keep_checkpoints=2
    ]
    state = load_checkpoint(ckpt)
    assert state["optimizer"]["param_groups"][0]["step"] == final["opt_steps"][0]

    # MLflow: the same run, its histories continuing where they stopped.
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run_ids(client, run.info.experiment_id) == runs_before  # no new run was created
    updates = client.get_metric_history(run_id, "perf/updates")
    assert [m.step for m in updates] == [16, 32, 48, 64, 80, 96]
    assert [m.value for m in updates] == [0, 1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run_id, "eval/return")] == [64, 96]
    assert run.data.params["train.total_steps"] == "64"  # params are immutable in MLflow


def test_resume_override_replaces_the_saved_one_of_the_same_key():
    saved = ["+bench=cartpole", "seed=0", "train.total_steps=64", "threads=1"]
    merged = train.merge_overrides(saved, ["threads=2", "train.total_steps=96"])
    assert merged == ["+bench=cartpole", "seed=0", "threads=2", "train.total_steps=96"]
    assert train.merge_overrides(saved, []) == saved


def test_resume_by_mlflow_run_id_finds_the_run_dir(cartpole_run, workdir, store):
    run_dir, run_id = cartpole_run
    tags = MlflowClient(tracking_uri=store).get_run(run_id).data.tags
    assert tags.get("run_dir") == str(run_dir.resolve())
    # What train.main does with resume=<run id> (without training the shared run further).
    assert train.resolve_run_dir(run_id, None) == run_dir.resolve()


def test_resuming_a_finished_run_trains_no_further(cartpole_run, workdir, capsys, monkeypatch):
    run_dir = copy_run(cartpole_run[0], workdir / "run")
    spy = Spy(monkeypatch)
    code, out = run_train(capsys, [f"resume={run_dir}", "tracking.enabled=false"])
    assert code == 0 and "at env step 64" in out
    assert [s["env_steps"] for s in spy.saves] in ([], [64])
    assert find_checkpoint(run_dir).name == "step_64"
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_64"]


def test_final_eval_return_is_in_the_checkpoint(cartpole_run, store):
    run_dir, run_id = cartpole_run
    logged = MlflowClient(tracking_uri=store).get_metric_history(run_id, "eval/return")
    state = load_checkpoint(find_checkpoint(run_dir))
    assert [tuple(x) for x in state["eval_returns"]] == [(m.step, m.value) for m in logged]


# --------------------------------------------------------------------------- signals


def subprocess_env(store: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONUNBUFFERED="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def wait_until_training(proc, run_dir: Path, stdout: Path, store: str, timeout: float) -> str:
    """Poll until the loop has logged metrics to MLflow (so it is inside ``Trainer.train``).

    Returns the MLflow run id. Fails with the process output if it exits or times out.
    """
    client, run_id, deadline = None, None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{stdout.read_text()}")
        if run_id is None:
            match = RUN_LINE.search(stdout.read_text())
            run_id = match["id"] if match else None
        scratch = run_dir / "replay_scratch"
        stored = scratch.is_dir() and any(p.is_file() for p in scratch.rglob("*.memmap"))
        if run_id and stored:
            client = client or MlflowClient(tracking_uri=store)
            if client.get_metric_history(run_id, "perf/fps"):
                return run_id
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"training did not start within {timeout} s:\n{stdout.read_text()}")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell does for `cmd &`


@pytest.mark.parametrize(
    ("sig", "preexec"),
    [
        # fast: test_faults_lifecycle.py's test_sigint_mid_run_is_resumable_with_make_train_
        # and_no_env sends a plain SIGINT mid-run; checks the checkpoint, exit 130, resume
        pytest.param(signal.SIGINT, None, marks=pytest.mark.slow),
        (signal.SIGTERM, None),
        (signal.SIGINT, _ignore_sigint),
    ],
    ids=["SIGINT", "SIGTERM", "SIGINT-background-job"],
)
def test_signal_saves_a_checkpoint_and_exits_130(sig, preexec, tmp_path, store):
    run_dir = tmp_path / "run"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    argv = [*tiny("cartpole"), "train.total_steps=1000000", f"run_dir={run_dir}"]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(TRAIN_PY), *argv],
            cwd=tmp_path,
            env=subprocess_env(store),
            stdout=out,
            stderr=err,
            preexec_fn=preexec,
        )
        try:
            run_id = wait_until_training(proc, run_dir, stdout, store, timeout=150)
            time.sleep(1.0)  # a little further into the loop (updates start at step 32)
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log, errors = stdout.read_text(), stderr.read_text()
    assert code == 130, f"{log}\n{errors}"
    assert "Traceback" not in errors, errors
    assert re.search(r"^stopped: \d+ env steps", log, re.M), log  # the word for a stop

    ckpt = find_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    steps = state["counters"]["env_steps"]
    assert ckpt.name == f"step_{steps}" and 16 <= steps < 1_000_000
    assert state["mlflow_run_id"] == run_id and "agent" in state and "optimizer" in state
    assert json.loads((ckpt / "meta.json").read_text())["replay"] == "saved"
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "KILLED"


# --------------------------------------------------------------------------- bad input


def train_cli(cwd: Path, store: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_PY), *argv],
        cwd=cwd,
        env=subprocess_env(store),
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    "override, needles",
    [
        ("env=nope", ["unknown env 'nope'", "valid: " + ", ".join(group_options("env"))]),
        (
            "train.nope=1",
            [
                "unknown config key 'train.nope'",
                "valid keys under 'train':",
                "total_steps",
                "train_ratio",
                "checkpoint_every",
            ],
        ),
        ("model=size3m", ["unknown model 'size3m'", "valid: " + ", ".join(group_options("model"))]),
    ],
    ids=["unknown-env", "unknown-key", "unknown-model"],
)
def test_bad_input_is_one_line_exit_2(override, needles, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = train_cli(tmp_path, uri, "env=cartpole", "threads=1", override)
    err = assert_one_line_error(proc, *needles)
    if override.startswith("env="):
        assert all(e in err for e in ("cartpole", "pendulum", "dmc_walker", "atari_pong"))
    assert list(tmp_path.iterdir()) == []  # no runs/ dir, no outputs/, no MLflow store


def test_resume_with_another_model_size_is_refused(cartpole_run, tmp_path, store):
    run_dir, run_id = cartpole_run
    run_dir = copy_run(run_dir, tmp_path / "copy" / "run")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree_digest(run_dir / "checkpoints")
    overrides = (run_dir / "overrides.txt").read_text()
    proc = train_cli(cwd, store, f"resume={run_dir}", "model=size12m")
    assert_one_line_error(proc, "model=size1m", "model=size12m")
    assert tree_digest(run_dir / "checkpoints") == before
    assert (run_dir / "overrides.txt").read_text() == overrides
    assert list(cwd.iterdir()) == []  # no new run dir
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "FINISHED"


def test_refused_resume_leaves_the_run_dir_unchanged(cartpole_run, workdir, capsys):
    run_dir = copy_run(cartpole_run[0], workdir / "run")
    before = tree_digest(run_dir)
    code, _ = run_train(capsys, [f"resume={run_dir}", "model=size12m"])
    assert code == 2
    assert OmegaConf.load(run_dir / "config.yaml").model.name == "size1m"
    after = tree_digest(run_dir)
    assert after == before, sorted(set(after) ^ set(before))


# --------------------------------------------------------------------------- make


def test_make_train_runs_the_pipeline():
    def dry_run(*args: str) -> list[list[str]]:
        proc = subprocess.run(
            ["make", "-n", "--no-print-directory", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        return [line.split() for line in proc.stdout.splitlines() if line.strip()]

    assert dry_run("train", "ENV=cartpole") == [
        [".venv/bin/python", "pipelines/train.py", "env=cartpole"]
    ]
    assert dry_run("train", "ENV=pendulum", "ARGS=seed=1 model=size12m") == [
        [".venv/bin/python", "pipelines/train.py", "env=pendulum", "seed=1", "model=size12m"]
    ]
    # A resume's env comes from the run's saved overrides, unless ENV is given explicitly.
    assert dry_run("train", "ARGS=resume=runs/x") == [
        [".venv/bin/python", "pipelines/train.py", "resume=runs/x"]
    ]
    assert dry_run("train", "ENV=cartpole", "ARGS=resume=runs/x") == [
        [".venv/bin/python", "pipelines/train.py", "env=cartpole", "resume=runs/x"]
    ]
    assert dry_run("train") == [[".venv/bin/python", "pipelines/train.py", "env=dmc_walker"]]


# fast: test_faults_lifecycle.py::test_sigint_mid_run_is_resumable_with_make_train_and_no_env
@pytest.mark.slow
def test_make_train_resumes_a_cartpole_run(workdir, capsys):
    """`make train ARGS="resume=<dir>"` (the README's command) works for a non-walker run."""
    run_dir = workdir / "run"
    code, _ = run_train(capsys, tiny("cartpole", f"run_dir={run_dir}"))
    assert code == 0
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), f"PY={sys.executable}", "train",
         f"ARGS=resume={run_dir} train.total_steps=96"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed {run_dir} at env step 64" in proc.stdout
    assert load_checkpoint(run_dir)["counters"]["env_steps"] == 96


def test_multi_async_collector_trains(workdir, capsys):
    """collector.num_workers > 1 selects MultiAsyncCollector; training runs through it and
    the prefill flag reaches the workers' policy copies."""
    run_dir = workdir / "run"
    code, out = run_train(
        capsys,
        [
            *tiny("cartpole"),
            "collector.num_workers=2",
            "train.total_steps=96",
            f"run_dir={run_dir}",
        ],
    )
    assert code == 0, out
    state = torch.load(run_dir / "checkpoints" / "step_96" / "state.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 96 and state["counters"]["updates"] > 0
    assert set(state["replay"]["stream_steps"]) == {0, 1}  # one step stream per worker env


def test_a_task_override_names_the_run_after_the_task():
    assert train.name_after_task(["env=cartpole", "env.task=Acrobot-v1"]) == [
        "env=cartpole", "env.task=Acrobot-v1", "env.name=acrobot_v1"
    ]
    kept = ["env=cartpole", "env.task=Acrobot-v1", "env.name=mine"]
    assert train.name_after_task(kept) == kept
    assert train.name_after_task(["env=cartpole"]) == ["env=cartpole"]
