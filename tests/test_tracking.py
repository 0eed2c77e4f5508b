"""Tests for dreamer_trl.tracking: MLflow round trips, videos, plots, reference curves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from dreamer_trl.tracking import (
    Tracker,
    default_artifact_location,
    flatten_config,
    load_reference_curve,
    load_reference_seeds,
    normalise_task_name,
    plot_learning_curve,
    reference_overlay,
)

REFERENCE_DIR = Path("/work/shared/reference_scores")
DMC_PROPRIO = REFERENCE_DIR / "dmc_proprio-dreamerv3.json.gz"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module: creating its schema takes ~2 s."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def store_uri(store_dir: Path) -> str:
    return f"sqlite:///{store_dir / 'mlflow.db'}"


@pytest.fixture
def tracker(store_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.chdir(tmp_path)  # nothing may land in the repo's cwd
    t = Tracker("tests", run_name="unit")
    yield t
    t.close()


def download(tracker: Tracker, artifact: str, dst: Path) -> Path:
    return Path(
        MlflowClient(tracker.tracking_uri).download_artifacts(tracker.run_id, artifact, str(dst))
    )


# --------------------------------------------------------------------------- flatten


def test_flatten_config_nested_dictconfig() -> None:
    cfg = OmegaConf.create(
        {
            "env": {"task": "walker-walk", "repeat": 2, "keys": ["a", "b"]},
            "model": {"size": "${env.task}", "empty": {}},
            "seed": 0,
            "missing": "???",
        }
    )
    flat = flatten_config(cfg)
    assert flat == {
        "env.task": "walker-walk",
        "env.repeat": "2",
        "env.keys": "['a', 'b']",
        "model.size": "walker-walk",
        "model.empty": "{}",
        "seed": "0",
        "missing": "???",
    }
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_config_truncates_to_mlflow_limit() -> None:
    flat = flatten_config({"long": "x" * (MAX_PARAM_VAL_LENGTH + 10)})
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH


# --------------------------------------------------------------------------- tracker


def test_params_metrics_roundtrip(tracker: Tracker) -> None:
    cfg = {"algo": {"lr": 1e-4, "horizon": 15}, "env": {"keys": ["obs"]}}
    tracker.log_params(cfg)
    many = {f"p{i}": i for i in range(150)}  # more than one log_batch call
    tracker.log_params(many)
    tracker.log_metrics(
        {"loss/model": torch.tensor(1.5), "fps": 300, "ret": np.float32(2.0)}, step=10
    )
    tracker.log_metrics({"loss/model": torch.tensor([0.5])}, step=20)

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["algo.lr"] == "0.0001"
    assert run.data.params["env.keys"] == "['obs']"
    assert run.data.params["p149"] == "149"
    history = client.get_metric_history(tracker.run_id, "loss/model")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (10, 1.5),
        (20, 0.5),
    ]
    assert run.data.metrics["fps"] == 300 and run.data.metrics["ret"] == 2.0


def test_log_metrics_rejects_non_scalar_tensor(tracker: Tracker) -> None:
    with pytest.raises(ValueError, match="3 elements"):
        tracker.log_metrics({"bad": torch.zeros(3)}, step=0)


def test_default_store_next_to_cwd(monkeypatch: pytest.MonkeyPatch, store_dir: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store_dir)  # reuses the module's database: no second schema creation
    t = Tracker("defaults", run_name="r")
    t.log_dict({"a": 1}, "config.json")
    t.close()
    assert t.tracking_uri == f"sqlite:///{store_dir / 'mlflow.db'}"
    assert (store_dir / "mlflow.db").is_file()
    assert (store_dir / "mlruns" / t.run_id / "artifacts" / "config.json").is_file()
    assert default_artifact_location(t.tracking_uri) == str(store_dir / "mlruns")


def test_artifacts_dict_figure_file_dir(tracker: Tracker, tmp_path: Path) -> None:
    tracker.log_dict(OmegaConf.create({"a": {"b": 1}}), "config.yaml")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, subdir="notes")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    tracker.log_artifact(folder, subdir="dir")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    tracker.log_figure(fig, "plots/fig.png")

    out = tmp_path / "out"
    out.mkdir()
    assert "b: 1" in download(tracker, "config.yaml", out).read_text()
    assert download(tracker, "notes/note.txt", out).read_text() == "hello"
    assert download(tracker, "dir/x.txt", out).read_text() == "x"
    assert download(tracker, "plots/fig.png", out).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("layout", ["thwc", "tchw", "gray", "odd"])
def test_log_video_is_readable_mp4(tracker: Tracker, tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    shape = {
        "thwc": (12, 64, 64, 3),
        "tchw": (12, 3, 64, 64),
        "gray": (12, 1, 64, 64),
        "odd": (12, 33, 47, 3),
    }[layout]
    frames = rng.integers(0, 255, size=shape, dtype=np.uint8)
    if layout == "tchw":
        frames = torch.from_numpy(frames)  # tensors are accepted too
    tracker.log_video(frames, f"videos/{layout}", fps=15)

    path = download(tracker, f"videos/{layout}.mp4", tmp_path)
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        assert reader.count_frames() == 12
        assert reader.get_meta_data()["fps"] == 15
        first = reader.get_data(0)
    finally:
        reader.close()
    expected_hw = {"odd": (34, 48)}.get(layout, (64, 64))
    assert first.shape == (*expected_hw, 3)


def test_log_video_rejects_bad_frames(tracker: Tracker) -> None:
    with pytest.raises(ValueError, match="uint8"):
        tracker.log_video(np.zeros((2, 8, 8, 3), np.float32), "v")
    with pytest.raises(ValueError, match="4-D"):
        tracker.log_video(np.zeros((8, 8, 3), np.uint8), "v")


def test_close_sets_status_and_resume(tracker: Tracker) -> None:
    tracker.log_params({"seed": 1})
    tracker.close("KILLED")
    tracker.close("FINISHED")  # idempotent: the first status wins
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "KILLED"

    resumed = Tracker("tests", tracking_uri=tracker.tracking_uri, run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    resumed.log_params({"seed": 2, "new": "x"})  # changed param skipped, not an error
    resumed.log_metrics({"after_resume": 1.0}, step=5)
    resumed.close()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "1" and run.data.params["new"] == "x"
    assert run.data.metrics["after_resume"] == 1.0


def test_context_manager_marks_failure(store_uri: str) -> None:
    with pytest.raises(RuntimeError), Tracker("tests", tracking_uri=store_uri) as t:
        raise RuntimeError("boom")
    assert MlflowClient(store_uri).get_run(t.run_id).info.status == "FAILED"


def test_disabled_tracker_is_a_noop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # would fail if used
    t = Tracker("x", run_name="y", enabled=False)
    t.log_params({"a": 1})
    t.log_metrics({"m": torch.tensor(1.0)}, step=0)
    t.log_artifact(tmp_path / "missing.txt")
    t.log_dict({"a": 1}, "a.json")
    t.log_video(np.zeros((2, 8, 8, 3), np.uint8), "v")
    t.log_figure(None, "f.png")
    t.close()
    assert t.run_id is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- plots


def test_plot_learning_curve_with_reference(tmp_path: Path) -> None:
    ref_steps = np.linspace(0, 1e5, 20)
    mean = np.linspace(0, 900, 20)
    out = plot_learning_curve(
        [0, 5e4, 1e5],
        [10, 300, 700],
        title="walker_walk",
        reference=(ref_steps, mean, mean - 50, mean + 50),
        path=tmp_path / "plots" / "curve.png",
    )
    assert out == tmp_path / "plots" / "curve.png"
    image = imageio.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100
    plain = plot_learning_curve([1, 2], [3, 4], path=tmp_path / "plain.png")
    assert plain.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- reference


def test_normalise_task_name() -> None:
    assert normalise_task_name("dmc_walker_walk") == normalise_task_name("walker-walk")
    assert normalise_task_name("atari_bank_heist") == normalise_task_name("ALE/BankHeist-v5")
    assert normalise_task_name("pong") == "pong"


@pytest.mark.skipif(not DMC_PROPRIO.is_file(), reason="reference scores not present")
@pytest.mark.parametrize("task", ["walker_walk", "dmc_walker_walk", "walker-walk"])
def test_load_reference_curve_real_file(task: str) -> None:
    curve = load_reference_curve(DMC_PROPRIO, task)
    assert curve is not None
    steps, mean = curve
    assert steps.shape == mean.shape and steps[0] == 10_000 and np.all(np.diff(steps) > 0)
    # README table: walker_walk reaches ~941 by 500k and ~478 around 100k (windowed mean).
    assert 800 < mean[-1] < 1000
    assert 250 < np.interp(100_000, steps, mean) < 700


@pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason="reference scores not present")
def test_load_reference_curve_atari_and_missing() -> None:
    assert load_reference_curve(REFERENCE_DIR / "atari100k-dreamerv3.json.gz", "pong") is not None
    assert load_reference_curve(DMC_PROPRIO, "no_such_task") is None
    assert load_reference_curve(REFERENCE_DIR / "missing.json.gz", "walker_walk") is None


def toy_scores(tmp_path: Path) -> Path:
    """Two seeds of ``toy_run``: seed 0 is y = x with a null, seed 1 is y = x + 10 on other
    steps; and another task that must be ignored."""
    runs = [
        {
            "task": "dmc_toy_run",
            "method": "dreamerv3",
            "seed": 0,
            "xs": [0, 10, 20, 30],
            "ys": [0, None, 20, 30],
        },
        {
            "task": "dmc_toy_run",
            "method": "dreamerv3",
            "seed": 1,
            "xs": [5, 15, 25, 40],
            "ys": [15, 25, 35, 50],
        },
        {"task": "dmc_other", "method": "dreamerv3", "seed": 0, "xs": [0], "ys": [1e9]},
    ]
    path = tmp_path / "toy.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(runs, f)
    return path


def test_load_reference_curve_nulls_and_grid(tmp_path: Path) -> None:
    steps, mean = load_reference_curve(toy_scores(tmp_path), "toy_run")
    assert steps[0] == 5 and steps[-1] == 30  # only where both seeds have data
    # seed 0 is y = x (null dropped), seed 1 is y = x + 10 -> mean = x + 5
    np.testing.assert_allclose(mean, steps + 5)


def test_reference_overlay_range_and_cut(tmp_path: Path) -> None:
    path = toy_scores(tmp_path)
    steps, returns = load_reference_seeds(path, "toy_run")
    assert returns.shape == (2, len(steps))
    np.testing.assert_allclose(returns[0], steps)
    np.testing.assert_allclose(returns[1], steps + 10)
    steps, mean, low, high = reference_overlay(path, "toy_run", until=20)
    assert steps[0] == 5 and steps[-1] <= 20 and len(steps) == np.sum(np.linspace(5, 30, 4) <= 20)
    np.testing.assert_allclose(low, steps)
    np.testing.assert_allclose(high, steps + 10)
    np.testing.assert_allclose(mean, steps + 5)
    assert reference_overlay(path, None) is None  # no task configured
    assert reference_overlay(None, "toy_run") is None  # no file configured
    assert reference_overlay(path, "no_such_task") is None
