"""Experiment tracking (MLflow) and the plots/reference curves it logs.

:class:`Tracker` talks to MLflow only through an explicit :class:`mlflow.MlflowClient`
bound to one run id, never through MLflow's global "active run" stack: several trackers (or
tests) can coexist in one process, and a crashed run can be resumed by id.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING",
    "Tracker",
    "default_artifact_location",
    "default_tracking_uri",
    "flatten_config",
    "is_run_id",
    "load_reference_curve",
    "load_reference_seeds",
    "normalise_task_name",
    "plot_learning_curve",
    "reference_overlay",
    "run_dir_of",
    "run_tags",
    "write_mp4",
]

log = logging.getLogger(__name__)

try:  # the store's limit, so long values (e.g. lists of obs keys) are cut, not rejected
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - moved in some future MLflow
    MAX_PARAM_VAL_LENGTH = 6000
try:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover
    MAX_TAG_VAL_LENGTH = 5000
_BATCH = 100  # MlflowClient.log_batch accepts at most 100 params and 1000 metrics per call
# MLflow 3.x opens an experiment in its GenAI (traces) view unless the experiment's kind says
# otherwise; these values are the UI's (mlflow/server/js: "custom_model_development" is its
# runs/charts model-training view). The UI itself may store the "*_inferred" guesses.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_INFERRED_KINDS = ("genai_development_inferred", "custom_model_development_inferred",
                   "no_inferred_type")


# --------------------------------------------------------------------------- config


def flatten_config(cfg: Any, *, max_len: int = MAX_PARAM_VAL_LENGTH) -> dict[str, str]:
    """Flatten a nested dict / OmegaConf config to ``{"a.b.c": "value"}`` MLflow params.

    Lists become their string form; values are truncated to ``max_len`` characters.
    Interpolations are resolved; mandatory-missing values (``???``) are kept as ``???``.
    """
    flat: dict[str, str] = {}
    _flatten_into(flat, "", _to_plain(cfg))
    return {key: value[:max_len] for key, value in flat.items()}


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def _flatten_into(out: dict[str, str], prefix: str, node: Any) -> None:
    if isinstance(node, Mapping) and (node or not prefix):
        for key, value in node.items():
            _flatten_into(out, f"{prefix}.{key}" if prefix else str(key), value)
    elif isinstance(node, (list, tuple)):
        out[prefix] = str(list(node))
    else:
        out[prefix] = str(node)


# --------------------------------------------------------------------------- tracker


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded store ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: ``mlruns/`` next to a sqlite database file.

    For servers (http) and other stores MLflow's own default is right, so ``None``.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> "//abs.db".
    raw = unquote(parsed.path)
    db_path = Path(raw[1:]) if raw.startswith("/") else Path(raw)
    return str(db_path.parent.resolve() / "mlruns")


class Tracker:
    """One MLflow run: params, metrics, artefacts. ``enabled=False`` makes it a no-op.

    Args:
        experiment: experiment name; created (with our artifact root) when new.
        run_name: display name of a new run.
        tracking_uri: store URI; defaults to :func:`default_tracking_uri`.
        run_id: resume this existing run instead of creating one.
        enabled: False turns every method into a no-op (tests, benchmarks).
        artifact_location: artifact root for a *new* experiment; defaults to ``mlruns/``
            next to the sqlite database.
        tags: tags set on the run.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        *,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.enabled = enabled
        self._run_id: str | None = None
        self._closed = False
        if not enabled:
            return
        from mlflow import MlflowClient  # deferred: importing mlflow costs ~1 s

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is not None:
            self._run_id = self._resume(run_id)
        else:
            exp_id = self._experiment_id(experiment, artifact_location)
            self._run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        for key, value in (tags or {}).items():
            self._client.set_tag(self._run_id, key, str(value))

    # -- setup

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            self._mark_model_training(exp)
            return exp.experiment_id
        location = artifact_location or default_artifact_location(self.tracking_uri)
        return self._client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )

    def _mark_model_training(self, exp: Any) -> None:
        """Tag an experiment we log into as model training when it has no kind of its own
        yet (experiments created before this tag existed): a kind set by a user stays."""
        if exp.tags.get(EXPERIMENT_KIND_TAG) in (None, "", *_INFERRED_KINDS):
            self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)

    def _resume(self, run_id: str) -> str:
        from mlflow.entities import RunStatus

        run = self._client.get_run(run_id)  # raises MlflowException for an unknown id
        self._mark_model_training(self._client.get_experiment(run.info.experiment_id))
        self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self._existing_params = dict(run.data.params)
        return run.info.run_id

    # -- properties

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (``None`` when disabled)."""
        return self._run_id

    @property
    def artifact_uri(self) -> str | None:
        """Where this run's artefacts are stored (``None`` when disabled)."""
        if not self.enabled:
            return None
        return self._client.get_run(self._run_id).info.artifact_uri

    # -- logging

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings, cut to the store's limit)."""
        if not self.enabled:
            return
        for key, value in tags.items():
            self._client.set_tag(self._run_id, key, str(value)[:MAX_TAG_VAL_LENGTH])

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as a file artefact ``name`` (e.g. ``error.txt``)."""
        if not self.enabled:
            return
        self._client.log_text(self._run_id, text, name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened with :func:`flatten_config`.

        On a resumed run, params already logged with the same value are skipped and changed
        ones are skipped with a warning: MLflow params are immutable.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten_config(params)
        flat = self._drop_existing(flat)
        items = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(items), _BATCH):
            self._client.log_batch(self._run_id, params=items[start : start + _BATCH])

    def _drop_existing(self, flat: dict[str, str]) -> dict[str, str]:
        existing = getattr(self, "_existing_params", None)
        if not existing:
            return flat
        changed = {
            k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v
        }
        if changed:
            log.warning("resumed run %s: not re-logging changed params %s", self._run_id, changed)
        return {k: v for k, v in flat.items() if k not in existing}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics (floats, numpy scalars or 1-element tensors) at ``step``.

        Tensors are converted here, with one device sync per device (not one per metric):
        callers can pass raw loss tensors without slowing the training loop.
        """
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        values = _to_floats(metrics)
        now = int(time.time() * 1000)
        items = [Metric(key, value, now, int(step)) for key, value in values.items()]
        for start in range(0, len(items), 10 * _BATCH):
            self._client.log_batch(self._run_id, metrics=items[start : start + 10 * _BATCH])

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Copy a file (or a whole directory's contents) into the run's artefacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path=subdir)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path=subdir)

    def log_dict(self, data: Any, name: str) -> None:
        """Store a dict/config as a JSON or YAML artefact (format from ``name``'s suffix)."""
        if not self.enabled:
            return
        self._client.log_dict(self._run_id, _to_plain(data), name)

    def log_figure(self, fig: Any, name: str) -> None:
        """Store a matplotlib figure as an image artefact (e.g. ``plots/curve.png``)."""
        if not self.enabled:
            return
        self._client.log_figure(self._run_id, fig, name)

    def log_video(self, frames: Any, name: str, fps: int = 30) -> None:
        """Encode uint8 frames ``[T,H,W,C]`` or ``[T,C,H,W]`` (C = 1 or 3) as mp4 and log it.

        ``name`` is the artefact path, e.g. ``videos/eval_step_10000.mp4``.
        """
        if not self.enabled:
            return
        video = _frames_to_thwc(frames)
        subdir, _, filename = name.rpartition("/")
        filename = filename if filename.endswith(".mp4") else filename + ".mp4"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            write_mp4(path, video, fps=fps)
            self._client.log_artifact(self._run_id, str(path), artifact_path=subdir or None)

    # -- lifecycle

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``KILLED`` or ``FAILED``; later calls do nothing."""
        if not self.enabled or self._closed:
            return
        if status not in ("FINISHED", "KILLED", "FAILED"):
            raise ValueError(f"status must be FINISHED, KILLED or FAILED, got {status!r}")
        self._client.set_terminated(self._run_id, status=status)
        self._closed = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert metric values to floats, batching tensors so each device syncs once."""
    out: dict[str, float] = {}
    by_device: dict[Any, list[tuple[str, Any]]] = {}
    for key, value in metrics.items():
        if hasattr(value, "detach") and hasattr(value, "device"):  # a torch tensor
            if value.numel() != 1:
                raise ValueError(f"metric {key!r} has {value.numel()} elements, expected 1")
            by_device.setdefault(value.device, []).append((key, value))
        else:
            out[key] = float(value)
    if by_device:
        import torch

        for items in by_device.values():
            stacked = torch.stack([v.detach().reshape(()).float() for _, v in items])
            out.update(zip([k for k, _ in items], stacked.tolist(), strict=True))
    return out


def _frames_to_thwc(frames: Any) -> np.ndarray:
    """Return uint8 ``[T,H,W,3]`` with even H and W (what H.264/yuv420p requires)."""
    video = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if video.ndim != 4:
        raise ValueError(f"video frames must be 4-D [T,H,W,C] or [T,C,H,W], got {video.shape}")
    if video.shape[-1] not in (1, 3) and video.shape[1] in (1, 3):
        video = video.transpose(0, 2, 3, 1)
    if video.shape[-1] not in (1, 3):
        raise ValueError(f"video frames need 1 or 3 channels, got shape {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8, got {video.dtype}")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(video)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 30) -> Path:
    """Write uint8 ``[T,H,W,3]`` frames to an H.264 mp4 with imageio-ffmpeg."""
    import imageio.v2 as imageio

    # macro_block_size=2: keep small frames (64x64) at their size instead of upscaling to 16k.
    with imageio.get_writer(
        str(path),
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=2,
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return Path(path)


# --------------------------------------------------------------------------- plots


def plot_learning_curve(
    steps: Sequence[float] | np.ndarray,
    returns: Sequence[float] | np.ndarray,
    *,
    reference: Sequence[Any] | None = None,
    title: str = "",
    path: str | Path,
) -> Path:
    """Save a PNG of eval return vs env steps, with an optional DreamerV3 reference.

    Args:
        steps, returns: this run's eval points.
        reference: ``(steps, mean)`` or ``(steps, mean, low, high)``
            (:func:`reference_overlay`); the mean drawn dashed, the band shaded.
        title: figure title.
        path: output PNG path (parent directories are created).
    """
    fig = _learning_curve_figure(steps, returns, reference=reference, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _learning_curve_figure(steps: Any, returns: Any, *, reference: Any, title: str) -> Any:
    # Figure() without pyplot renders with Agg and touches no global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.add_subplot()
    if reference is not None:
        ref_steps, ref_mean = np.asarray(reference[0]), np.asarray(reference[1])
        ax.plot(ref_steps, ref_mean, "--", color="gray", label="DreamerV3 reference (mean)")
        if len(reference) >= 4:
            ax.fill_between(
                ref_steps, reference[2], reference[3], color="gray", alpha=0.2,
                label="reference seeds' range",
            )
    ax.plot(np.asarray(steps), np.asarray(returns), "o-", color="C0", label="this run")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("eval return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


# --------------------------------------------------------------------------- reference


def normalise_task_name(task: str) -> str:
    """Canonical task name: ``dmc_walker_walk``/``walker-walk`` -> ``walker_walk``,
    ``atari_bank_heist``/``ALE/BankHeist-v5`` -> ``bank_heist``."""
    name = task.strip()
    name = re.sub(r"^ALE/", "", name)
    name = re.sub(r"(NoFrameskip)?-v\d+$", "", name)
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    name = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    return re.sub(r"^(dmc|atari100k|atari|dm_control)_", "", name)


def load_reference_curve(path: str | Path, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Seed-averaged reference curve for ``task`` from a DreamerV3 scores file.

    Returns:
        ``(steps, mean_return)`` on :func:`load_reference_seeds`' grid, or ``None`` if the
        file or the task is missing.
    """
    seeds = load_reference_seeds(path, task)
    return None if seeds is None else (seeds[0], seeds[1].mean(axis=0))


def reference_overlay(
    path: str | Path | None, task: str | None, until: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(steps, mean, lowest seed, highest seed)`` of the reference for ``task``, the
    ``reference`` argument of :func:`plot_learning_curve`, up to step ``until``; ``None``
    without a file or the task in it. The seeds' range shows how far one seed may land
    from the mean."""
    seeds = load_reference_seeds(path, task) if path and task else None
    if seeds is None:
        return None
    steps, returns = seeds
    keep = steps <= until if until is not None else np.ones_like(steps, dtype=bool)
    returns = returns[:, keep]
    return steps[keep], returns.mean(axis=0), returns.min(axis=0), returns.max(axis=0)


def load_reference_seeds(path: str | Path, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Every reference seed's curve for ``task`` on one grid of steps.

    The file is gzipped JSON: a list of runs ``{"task","method","seed","xs","ys"}``. Each
    seed is linearly interpolated onto a common grid spanning the steps *all* seeds cover
    (so a mean or a range never mixes in a different number of seeds), null points dropped.

    Returns:
        ``(steps (N,), returns (S, N))`` for S seeds, or ``None`` if the file or the task
        is missing.
    """
    runs = _read_runs(Path(path))
    want = normalise_task_name(task)
    curves = [_clean_run(run) for run in runs if normalise_task_name(str(run["task"])) == want]
    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    lo = max(xs[0] for xs, _ in curves)
    hi = min(xs[-1] for xs, _ in curves)
    if hi < lo:  # seeds do not overlap at all: fall back to the longest one
        curves = [max(curves, key=lambda c: len(c[0]))]
        lo, hi = curves[0][0][0], curves[0][0][-1]
    grid = np.linspace(lo, hi, num=max(len(xs) for xs, _ in curves))
    return grid, np.stack([np.interp(grid, xs, ys) for xs, ys in curves])


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data if isinstance(data, list) else []


def _clean_run(run: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted ``(xs, ys)`` without null/NaN points, or None if nothing is left."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(run.get("xs", []), run.get("ys", []), strict=False)
        if x is not None and y is not None and math.isfinite(float(y))
    ]
    if not pairs:
        return None
    xs, ys = np.asarray(sorted(pairs)).T
    return xs, ys


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the form of an MLflow run id (32 lowercase hex digits)."""
    return bool(_RUN_ID.match(text))


def run_tags(run_id: str, tracking_uri: str | None = None) -> dict[str, str] | None:
    """The tags of an MLflow run, or None when the store has no such run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    try:
        return dict(client.get_run(run_id).data.tags)
    except MlflowException:
        return None


def run_dir_of(run_id: str, tracking_uri: str | None = None) -> str | None:
    """The ``run_dir`` tag of an MLflow run (set by the training pipeline), or None."""
    return (run_tags(run_id, tracking_uri) or {}).get("run_dir")
