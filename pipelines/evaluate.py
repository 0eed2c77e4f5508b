"""Evaluate a checkpoint: `make eval CKPT=<checkpoint dir | run dir | MLflow run id>
[ARGS="episodes=10 greedy=true video=true"]`.

The agent is rebuilt from the config stored in the checkpoint and its weights loaded; nothing
of the run (replay, optimiser, counters) is touched. Prints one summary line and writes
``eval.json`` (+ ``eval.mp4`` of the first episode) into the checkpoint directory or ``out=``.
When the checkpoint belongs to an MLflow run and tracking is on, the metrics
(``evaluate/return``, ``evaluate/return_std``, ``evaluate/length`` at the checkpoint's env step)
and both files (under ``evaluate/step_<N>/``) are logged to that run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

# option -> (default, help); every option is given as key=value.
OPTIONS: dict[str, tuple[str | None, str]] = {
    "ckpt": (None, "checkpoint dir, run dir, state.pt or MLflow run id (required)"),
    "episodes": ("10", "number of eval episodes"),
    "greedy": ("false", "act with the policy's mode (the reference samples)"),
    "video": ("true", "record the first episode to eval.mp4"),
    "out": (None, "output dir (default: the checkpoint dir)"),
    "device": ("cpu", "cpu | cuda | cuda:N | auto"),
    "tracking": (None, "log to the checkpoint's MLflow run (default: its config)"),
}
EVAL_JSON, EVAL_MP4 = "eval.json", "eval.mp4"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_options(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments to typed options; ConfigError (one line) on anything else."""
    raw = key_values(argv, {key: default for key, (default, _) in OPTIONS.items()})
    if not raw["ckpt"]:
        raise ConfigError(
            "ckpt=<checkpoint dir | run dir | MLflow run id> is required "
            "(make eval CKPT=runs/<env>/<run>)"
        )
    try:
        episodes = int(raw["episodes"])
    except ValueError:
        episodes = 0
    if episodes < 1:
        raise ConfigError(f"episodes must be an integer >= 1, got {raw['episodes']!r}")
    return {
        "ckpt": raw["ckpt"],
        "episodes": episodes,
        "greedy": _bool("greedy", raw["greedy"]),
        "video": _bool("video", raw["video"]),
        "out": Path(raw["out"]).expanduser() if raw["out"] else None,
        "device": raw["device"],
        "tracking": None if raw["tracking"] is None else _bool("tracking", raw["tracking"]),
    }


def _bool(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def locate_checkpoint(ckpt: str) -> Path:
    """The checkpoint dir for a path (checkpoint, run dir, state.pt) or an MLflow run id.

    A run id is looked up only when no such path exists and it looks like one (32 hex
    digits), in ``$MLFLOW_TRACKING_URI`` or the default store.
    """
    from dreamer_trl.checkpoint import find_checkpoint
    from dreamer_trl.tracking import is_run_id

    if Path(ckpt).expanduser().exists() or not is_run_id(ckpt):
        return find_checkpoint(ckpt)  # CheckpointError names what it expected
    from pipelines.train import resolve_run_dir

    try:
        run_dir = resolve_run_dir(ckpt, None)
    except ConfigError:
        raise ConfigError(
            f"ckpt={ckpt!r} is neither a path nor an MLflow run id with a run_dir tag "
            "(set MLFLOW_TRACKING_URI to the store the run was logged to)"
        ) from None
    return find_checkpoint(run_dir)


def load_agent_trainer(path: Path, opts: dict[str, Any], scratch: str):
    """(Trainer holding the checkpoint's agent, checkpoint state). The trainer lives in
    ``scratch`` so nothing of the checkpoint's run dir is touched."""
    from omegaconf import OmegaConf

    from dreamer_trl.checkpoint import CheckpointError, load_checkpoint
    from dreamer_trl.trainer import Trainer, resolve_device

    state = load_checkpoint(path, expected_meta=None)
    if not isinstance(state.get("config"), dict) or "agent" not in state:
        raise CheckpointError(f"checkpoint {path} has no stored config or agent weights")
    cfg = OmegaConf.create(state["config"])
    try:
        resolve_device(opts["device"])
    except RuntimeError as err:
        raise ConfigError(f"device={opts['device']!r}: {err}") from None
    cfg.device = opts["device"]
    cfg.compile.enabled = False  # compile only speeds up the training loss
    cfg.eval.greedy = opts["greedy"]
    trainer = Trainer(cfg, scratch)
    try:
        trainer.agent.load_state_dict(state["agent"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the agent its config builds: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return trainer, state


def write_outputs(out: Path, report: dict[str, Any], frames: Any) -> tuple[Path, Path | None]:
    """eval.json and (when there are frames) eval.mp4 in ``out``."""
    from dreamer_trl.tracking import _frames_to_thwc, write_mp4

    out.mkdir(parents=True, exist_ok=True)
    video = None
    if frames is not None:
        video = write_mp4(out / EVAL_MP4, _frames_to_thwc(frames))
    report["video"] = str(video) if video else None
    path = out / EVAL_JSON
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path, video


def log_to_mlflow(cfg: Any, run_id: str, report: dict, files: list[Path]) -> None:
    """Metrics and files to the checkpoint's run, leaving the run's status as it was."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dreamer_trl.tracking import Tracker, default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri()
    try:
        status = MlflowClient(tracking_uri=uri).get_run(run_id).info.status
        tracker = Tracker(cfg.tracking.experiment or cfg.env.name, tracking_uri=uri, run_id=run_id)
    except MlflowException as err:
        print(f"warning: not logged to MLflow run {run_id} at {uri}: {err}", file=sys.stderr)
        return
    step = report["env_steps"]
    tracker.log_metrics(
        {
            "evaluate/return": report["mean"],
            "evaluate/return_std": report["std"],
            "evaluate/length": report["mean_length"],
        },
        step,
    )
    for path in files:
        tracker.log_artifact(path, f"evaluate/step_{step}")
    if status in ("FINISHED", "KILLED", "FAILED"):  # resuming marked it RUNNING
        tracker.close(status)
    print(f"logged to MLflow run {run_id} ({uri})", flush=True)


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    path = locate_checkpoint(opts["ckpt"])
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="dreamer_eval_") as scratch:
        trainer, state = load_agent_trainer(path, opts, scratch)
        _, frames = trainer.evaluate(opts["episodes"], video=opts["video"])
    cfg = trainer.cfg
    returns, lengths = trainer.last_eval["returns"], trainer.last_eval["lengths"]
    report = {
        "checkpoint": str(path.resolve()),
        "env": cfg.env.name,
        "env_steps": int(state.get("counters", {}).get("env_steps", 0)),
        "episodes": len(returns),
        "greedy": opts["greedy"],
        "returns": returns,
        "lengths": lengths,
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "mean_length": float(np.mean(lengths)),
        "mlflow_run_id": state.get("mlflow_run_id"),
    }
    json_path, video = write_outputs(opts["out"] or path, report, frames)
    print(
        f"{report['env']} @ {report['env_steps']} env steps: return {report['mean']:.2f} ± "
        f"{report['std']:.2f} over {report['episodes']} episodes, mean length "
        f"{report['mean_length']:.1f} ({'greedy' if opts['greedy'] else 'sampled'} actions) "
        f"-> {json_path}",
        flush=True,
    )
    tracking = cfg.tracking.enabled if opts["tracking"] is None else opts["tracking"]
    if report["mlflow_run_id"] and tracking:
        files = [json_path, *([video] if video else [])]
        log_to_mlflow(cfg, report["mlflow_run_id"], report, files)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
