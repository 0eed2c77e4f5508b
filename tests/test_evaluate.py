"""`pipelines/evaluate.py` end to end: a tiny cartpole run trained by `pipelines/train.py`,
evaluated from its run dir, its checkpoint dir and its MLflow run id; eval.json / eval.mp4 are
checked, and bad input exits 2 with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import evaluate  # noqa: E402
from pipelines.common import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny cartpole run (tests/tiny.py): evaluations write into it."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(tiny_run("cartpole"), run, symlinks=True)
    return run


def evaluate_ok(capsys, *args: str) -> dict:
    """Run the pipeline; it must succeed with one summary line. Returns eval.json."""
    capsys.readouterr()
    assert run_cli(evaluate.main, list(args)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "env steps: return" in line]
    assert len(lines) == 1, lines
    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), None)
    report = json.loads(((Path(out) if out else _ckpt(args)) / "eval.json").read_text())
    assert f"over {report['episodes']} episodes" in lines[0]
    return report


def _ckpt(args: tuple[str, ...]) -> Path:
    from dreamer_trl.checkpoint import find_checkpoint

    return find_checkpoint(next(a.split("=", 1)[1] for a in args if a.startswith("ckpt=")))


def check_video(path: Path, frames: int) -> None:
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        video = np.stack([frame for frame in reader])  # list(reader) trusts a bogus len()
    assert video.shape == (frames, 128, 128, 3) and video.dtype == np.uint8
    assert not np.array_equal(video[0], video[-1])  # the cart/pole moved


def test_evaluate_run_dir_and_checkpoint_dir(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "step_64"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    report = evaluate_ok(capsys, f"ckpt={run_dir}", "episodes=3", f"out={tmp_path}")
    assert report["checkpoint"] == str(ckpt.resolve()) and report["env_steps"] == 64
    assert report["episodes"] == 3 and len(report["returns"]) == len(report["lengths"]) == 3
    assert report["returns"] == [float(n) for n in report["lengths"]]  # cartpole: +1 per step
    assert report["mean"] == pytest.approx(np.mean(report["returns"]))
    assert report["std"] == pytest.approx(np.std(report["returns"]))
    assert report["mean_length"] == pytest.approx(np.mean(report["lengths"]))
    assert report["greedy"] is False and report["mlflow_run_id"] is None
    assert report["video"] == str(tmp_path / "eval.mp4")
    check_video(tmp_path / "eval.mp4", report["lengths"][0] + 1)  # reset frame + each step

    # Default output: the checkpoint dir. No video; the same (seeded) episodes.
    again = evaluate_ok(capsys, f"ckpt={ckpt}", "episodes=3", "video=false")
    assert (ckpt / "eval.json").is_file() and not (ckpt / "eval.mp4").exists()
    assert again["returns"] == report["returns"] and again["video"] is None
    greedy = evaluate_ok(capsys, f"ckpt={ckpt / 'state.pt'}", "episodes=1", "greedy=yes")
    assert greedy["greedy"] is True and (ckpt / "eval.mp4").is_file()


def test_evaluate_logs_to_the_mlflow_run(run_dir, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from dreamer_trl.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("evaluate-test", run_name="run", tracking_uri=uri)
    # A copy of the run whose checkpoint names that MLflow run, as a tracked run's would.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state_path = copy / "checkpoints" / "step_64" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["mlflow_run_id"] = tracker.run_id
    state["config"]["tracking"].update(enabled=True, uri=uri)
    torch.save(state, state_path)
    (state_path.parent / "manifest.json").unlink()  # edited by hand: its checksums no longer hold
    client = MlflowClient(tracking_uri=uri)
    client.set_tag(tracker.run_id, "run_dir", str(copy))  # what run ids resolve through
    tracker.close("KILLED")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where a run id is looked up
    report = evaluate_ok(capsys, f"ckpt={tracker.run_id}", "episodes=2", f"out={tmp_path}")
    assert report["mlflow_run_id"] == tracker.run_id
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["evaluate/return"] == pytest.approx(report["mean"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "evaluate/length")] == [64]
    files = {f.path for f in client.list_artifacts(tracker.run_id, "evaluate/step_64")}
    assert files == {"evaluate/step_64/eval.json", "evaluate/step_64/eval.mp4"}
    assert run.info.status == "KILLED"  # the run's status is left as it was

    capsys.readouterr()
    assert run_cli(evaluate.main, ["ckpt=" + "0" * 32]) == 2
    assert "neither a path nor an MLflow run id" in capsys.readouterr().err


def one_line_error(capsys, argv: list[str], match: str) -> None:
    capsys.readouterr()
    assert run_cli(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    corrupt = tmp_path / "checkpoints" / "step_5"
    corrupt.mkdir(parents=True)
    (corrupt / "state.pt").write_bytes(b"not a checkpoint")
    one_line_error(capsys, [f"ckpt={tmp_path / 'nope'}"], "the path does not exist")
    one_line_error(capsys, [f"ckpt={tmp_path}"], "is corrupt or truncated")
    one_line_error(capsys, [f"ckpt={tmp_path}", "episode=3"], "valid options (key=value): ckpt")
    one_line_error(capsys, [f"ckpt={tmp_path}", "episodes=0"], "episodes must be")
    one_line_error(capsys, [f"ckpt={tmp_path}", "video=maybe"], "video must be true or false")
    one_line_error(capsys, ["ckpt="], "ckpt=<checkpoint dir")
    # The real command line (what `make eval CKPT=...` runs).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "evaluate.py"), f"ckpt={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: no checkpoint at")
