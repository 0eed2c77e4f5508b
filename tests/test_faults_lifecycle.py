"""Every exit of `pipelines/train.py` leaves a true record (issue 15, items 2 and 7-10).

* a crash mid-run: MLflow run FAILED, ``error`` tag, traceback artefact ``error.txt``;
* a stop (Ctrl-C / SIGTERM) at start-up, during torch.compile's compilation, before the first
  checkpoint and mid-run: exit 130, one ``stopped: ...`` line, no traceback; resumable (with
  `make train ARGS="resume=<dir>"`, no ENV) or recorded as never checkpointed;
* a copied run dir resumed: a new MLflow run (``resumed_from``), the original's tags intact;
  ``tracking.continue=true`` continues the original instead;
* a bad env id (or any failure while the trainer is built): no run dir;
* ``env.task=`` without ``env.name=``: run dir and experiment named after the task;
* our experiments open in MLflow's model-training view (``mlflow.experimentKind``).

Stops in subprocesses are sent to the whole process group (``os.killpg``), as a terminal's
Ctrl-C is: worker processes (inductor's compile workers, collector workers) get it too.
Runs are tiny (the cartpole settings of tests/test_pipeline.py, no eval video).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "pipelines" / "train.py"
sys.path.insert(0, str(ROOT))

from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from dreamer_trl.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer  # noqa: E402
from pipelines import train  # noqa: E402
from pipelines.common import run_cli  # noqa: E402

TINY = [
    "env=cartpole",
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
    "train.train_ratio=1",  # one update per 16-step collector batch once training starts
    "train.log_every=16",
    "train.eval_episodes=1",
    "train.progress=false",
    "replay.capacity=1000",
    "eval.video=false",  # rendering is not what these tests are about
    "threads=1",
    "device=cpu",
    "compile.policy=false",
    "compile.steps=false",
    "tracking.log_model=false",  # each finished run's ONNX export: ~15 s (test_export.py)
]
RUN_LINE = re.compile(r"^run dir (?P<dir>.+) \| mlflow run (?P<id>\w+) \|", re.M)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """train.main installs SIGINT/SIGTERM handlers for the whole process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating one runs migrations: seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def workdir(tmp_path, store, monkeypatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_train(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``train.main`` through ``run_cli``, as the script runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli(train.main, argv)
    out, err = capsys.readouterr()
    sys.stdout.write(out)  # visible in a failure report
    sys.stderr.write(err)
    return code, out, err


def run_id_of(out: str) -> str:
    match = RUN_LINE.search(out)
    assert match, out
    return match["id"]


def subprocess_env(store: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONUNBUFFERED="1", **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


class Training:
    """`pipelines/train.py` in its own process group (so a stop reaches every process it
    starts, as a terminal's Ctrl-C does), its output in files."""

    def __init__(self, tmp: Path, store: str, argv: list[str], **env: str) -> None:
        self.stdout, self.stderr = tmp / "stdout.txt", tmp / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(TRAIN_PY), *argv],
                cwd=tmp,
                env=subprocess_env(store, **env),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, "\n".join(self.output()), re.M):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {pattern!r}: {self.output()}")
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"no {pattern!r} within {timeout} s: {self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def assert_one_stop_line(out: str, err: str) -> str:
    """The stop printed one line, ``stopped: ...``, last, and no traceback."""
    assert "Traceback" not in err, err
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("stopped: "), out
    assert sum(line.startswith("stopped") for line in lines) == 1, out
    assert not any(line.startswith("killed") for line in lines), out  # the old word
    return lines[-1]


# --------------------------------------------------------------------------- crash


def test_a_crash_mid_run_marks_the_run_failed_with_error_and_traceback(
    workdir, store, capsys, monkeypatch
):
    run_dir = workdir / "run"
    update = Trainer.update

    def failing_update(self, ahead=False):  # a bug in the 3rd update, after step 32's checkpoint
        if self.counters["updates"] == 2:
            raise ZeroDivisionError("injected fault in update 3")
        return update(self, ahead)

    monkeypatch.setattr(Trainer, "update", failing_update)
    code, out, err = run_train(
        capsys, [*TINY, "train.checkpoint_every=32", f"run_dir={run_dir}"]
    )
    assert code == 1
    assert "Traceback" in err and "failing_update" in err  # users need the traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ZeroDivisionError: injected fault in update 3"), err
    run_id = run_id_of(out)
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ZeroDivisionError: injected fault in update 3"
    assert run.data.tags["checkpoint"] == str(run_dir / "checkpoints" / "step_32")
    text = Path(client.download_artifacts(run_id, "error.txt", str(workdir))).read_text()
    assert text.startswith("Traceback") and "failing_update" in text and "injected" in text
    assert load_checkpoint(run_dir)["counters"]["env_steps"] == 32  # resumable from there


def test_error_tag_is_cut_to_a_sane_length(workdir, store, capsys, monkeypatch):
    def failing_train(self, tracker):
        raise RuntimeError("x" * 10_000 + "\nsecond line")

    monkeypatch.setattr(Trainer, "train", failing_train)
    code, out, err = run_train(capsys, [*TINY, f"run_dir={workdir / 'run'}"])
    assert code == 1 and "Traceback" in err
    tags = MlflowClient(tracking_uri=store).get_run(run_id_of(out)).data.tags
    assert tags["error"].startswith("RuntimeError: xxx") and len(tags["error"]) <= 500
    assert tags["checkpoint"].startswith("none")
    assert not (workdir / "run").exists()  # nothing to resume: no run dir left


# --------------------------------------------------------------------------- stops


def test_a_stop_before_the_first_checkpoint_is_recorded_as_such(
    workdir, store, capsys, monkeypatch
):
    """What the SIGINT/SIGTERM handler raises, at the start of the training loop."""

    def interrupted_train(self, tracker):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted_train)
    code, out, err = run_train(capsys, TINY)  # default run dir: runs/cartpole/<stamp>
    assert code == 130
    line = assert_one_stop_line(out, err)
    assert "before the first checkpoint, nothing to resume (run dir removed" in line
    assert not (workdir / "runs").exists()  # run dir and the parents it made are gone
    run = MlflowClient(tracking_uri=store).get_run(run_id_of(out))
    assert run.info.status == "KILLED"
    assert run.data.tags["checkpoint"].startswith("none: stopped before the first checkpoint")


def test_sigint_at_start_up_exits_130_with_one_line(tmp_path, store):
    client = MlflowClient(tracking_uri=store)
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    job = Training(tmp_path, store, TINY)
    time.sleep(1.5)  # inside the imports (torch alone takes longer) - before any step
    assert job.proc.poll() is None and "run dir" not in job.output()[0]
    code = job.stop()
    out, err = job.output()
    assert code == 130, (out, err)
    assert out == "stopped: during start-up; nothing recorded\n", out
    assert "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt", "stdout.txt"]
    ids = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(ids)) == runs_before  # no MLflow run was opened


def test_sigint_during_compilation_exits_cleanly(tmp_path, store):
    """Ctrl-C while inductor compiles the acting step (a cold cache: the real compile)."""
    argv = [*TINY, "compile.policy=true", "train.total_steps=100000", f"run_dir={tmp_path / 'r'}"]
    job = Training(
        tmp_path,
        store,
        argv,
        TORCH_LOGS="graph_code",  # dynamo prints the graph as it hands it to inductor
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )
    job.wait_for("TRACED GRAPH")
    time.sleep(1.0)  # into inductor's lowering / codegen (tens of seconds cold on CPU)
    assert "step 16" not in job.output()[0]  # no env step yet: still compiling
    # The interrupt lands when the C++ compile in progress returns: on a loaded 2-core box
    # that took over 60 s once (CI beside two training runs).
    code = job.stop(timeout=180)
    out, err = job.output()
    assert code == 130, (out, err)
    line = assert_one_stop_line(out, err)
    run = MlflowClient(tracking_uri=store).get_run(run_id_of(out))
    assert run.info.status == "KILLED"
    if "before the first checkpoint" in line:  # stopped before the loop's try: no checkpoint
        assert not (tmp_path / "r").exists()
        assert run.data.tags["checkpoint"].startswith("none")
    else:  # stopped inside the loop: it saved one
        assert load_checkpoint(tmp_path / "r")["mlflow_run_id"] == run.info.run_id


def test_a_stop_raised_inside_a_weakref_callback_is_not_lost(monkeypatch):
    """A signal handler runs at any bytecode; when its KeyboardInterrupt is raised in a weakref
    callback, Python prints it and drops it (CI once saw the compile-stop test train on for
    minutes: the Ctrl-C had landed in inductor's ExactWeakKeyDictionary callback). The stop
    must reach the code that follows instead."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    train.install_stop_signals()

    class Cached:
        pass

    def callback(_):  # where the handler happened to run
        raise KeyboardInterrupt

    try:
        entry = Cached()
        ref = weakref.ref(entry, callback)
        with pytest.raises(KeyboardInterrupt):
            del entry  # the callback runs here, its exception cannot propagate
            for _ in range(100):  # the code after it: the stop must arrive here
                time.sleep(0.01)
        assert ref() is None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_sigint_mid_run_is_resumable_with_make_train_and_no_env(tmp_path, store):
    run_dir = tmp_path / "run"
    job = Training(tmp_path, store, [*TINY, "train.total_steps=100000", f"run_dir={run_dir}"])
    job.wait_for(r"^step 48 updates")  # updates run from step 32
    code = job.stop()
    out, err = job.output()
    assert code == 130, (out, err)
    line = assert_one_stop_line(out, err)
    match = re.fullmatch(r"stopped: (\d+) env steps, (\d+) updates; checkpoint (.+) \(resume=.+\)",
                         line)
    assert match, line
    steps = int(match[1])
    assert steps >= 48 and int(match[2]) >= 2
    assert Path(match[3]) == find_checkpoint(run_dir)
    run_id = run_id_of(out)
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["checkpoint"] == match[3]

    # The README's resume command, for a cartpole run: make must not inject env=dmc_walker.
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), f"PY={sys.executable}", "train",
         f"ARGS=resume={run_dir} train.total_steps={steps + 16}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(store),
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    assert f"resumed {run_dir} at env step {steps}" in proc.stdout
    assert load_checkpoint(run_dir)["counters"]["env_steps"] == steps + 16
    assert run_id_of(proc.stdout) == run_id  # the same dir continues the same MLflow run
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- run identity


def test_a_copied_run_dir_resumed_gets_a_new_mlflow_run(workdir, store, capsys):
    client = MlflowClient(tracking_uri=store)
    original = workdir / "a"
    code, out, _ = run_train(capsys, [*TINY, f"run_dir={original}"])
    assert code == 0
    first = run_id_of(out)
    before = client.get_run(first)
    assert before.data.tags["run_dir"] == str(original.resolve())

    copy = shutil.copytree(original, workdir / "b")
    code, out, _ = run_train(capsys, [f"resume={copy}", "train.total_steps=80"])
    assert code == 0 and "resumed" in out and "new MLflow run" in out
    second = run_id_of(out)
    assert second != first
    new = client.get_run(second)
    assert new.data.tags["run_dir"] == str(copy.resolve())
    assert new.data.tags["resumed_from"] == first
    assert new.data.params["env.name"] == "cartpole"  # a new run gets the config again
    assert load_checkpoint(copy)["mlflow_run_id"] == second  # so its next resume continues it
    after = client.get_run(first)
    assert after.data.tags == before.data.tags and after.info.status == "FINISHED"
    assert load_checkpoint(original)["counters"]["env_steps"] == 64  # untouched

    # tracking.continue=true: a moved dir continues the original run (its tag follows it);
    # the choice is this resume's, not saved for later ones.
    moved = workdir / "moved"
    shutil.move(original, moved)
    code, out, _ = run_train(
        capsys, [f"resume={moved}", "train.total_steps=80", "tracking.continue=true"]
    )
    assert code == 0 and run_id_of(out) == first
    assert client.get_run(first).data.tags["run_dir"] == str(moved.resolve())
    assert "tracking.continue" not in (moved / "overrides.txt").read_text()


# --------------------------------------------------------------------------- run dir, names


def test_a_bad_env_id_leaves_no_run_dir(workdir, capsys):
    code, _, err = run_train(capsys, [*TINY, "env.task=Nope-v1"])
    assert code == 2 and err.startswith("error: unknown gym id 'Nope-v1'"), err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("fault", [ValueError, KeyboardInterrupt], ids=["error", "stop"])
def test_a_failure_or_stop_while_building_the_trainer_leaves_no_run_dir(
    fault, workdir, capsys, monkeypatch
):
    """The replay scratch dir is the trainer's first write (after the env and the agent);
    an error or a Ctrl-C after it, before the MLflow run exists, leaves nothing behind."""

    def refused(self, capacity):
        assert self.scratch.is_dir()  # the run dir exists by now
        raise fault("replay refused (injected)")

    monkeypatch.setattr(Trainer, "make_replay", refused)
    code, out, err = run_train(capsys, TINY)
    if fault is ValueError:
        assert code == 2 and err == "error: replay refused (injected)\n"
    else:
        assert code == 130 and err == ""
        assert assert_one_stop_line(out, err) == "stopped: during start-up; nothing recorded"
    assert list(workdir.iterdir()) == []


def test_a_task_override_names_run_dir_and_experiment(workdir, store, capsys):
    argv = [*TINY, "env.task=Acrobot-v1", "env.max_episode_steps=50", "train.total_steps=32"]
    code, out, _ = run_train(capsys, argv)
    assert code == 0, out
    run_dir = Path(RUN_LINE.search(out)["dir"])
    assert run_dir.parent == Path("runs/acrobot_v1") and (run_dir / "config.yaml").exists()
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id_of(out))
    assert client.get_experiment(run.info.experiment_id).name == "acrobot_v1"
    assert run.data.params["env.name"] == "acrobot_v1"  # also the learning curve's title
    assert train.name_after_task(["env.task=ALE/Pong-v5"])[-1] == "env.name=ale_pong_v5"
    explicit = ["env.task=Acrobot-v1", "env.name=mine"]
    assert train.name_after_task(explicit) == explicit


# --------------------------------------------------------------------------- MLflow view


def test_experiments_open_in_the_model_training_view(store):
    client = MlflowClient(tracking_uri=store)
    Tracker("kind-new", run_name="r", tracking_uri=store).close()
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING

    old = client.create_experiment("kind-old")  # made before the tag existed
    Tracker("kind-old", run_name="r", tracking_uri=store).close()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING

    mine = client.create_experiment("kind-user", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker("kind-user", run_name="r", tracking_uri=store).close()
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_by_run_id_of_a_moved_dir_is_one_line(monkeypatch):
    import dreamer_trl.tracking as tracking

    monkeypatch.setattr(tracking, "run_dir_of", lambda run_id, uri: "/nonexistent/run")
    with pytest.raises(train.ConfigError, match="run dir /nonexistent/run is gone"):
        train.resolve_run_dir("0123456789abcdef0123456789abcdef", None)
