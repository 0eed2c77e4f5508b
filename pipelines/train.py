"""Train DreamerV3: `make train ENV=dmc_walker [ARGS="hydra overrides"]`.

A run lives in ``run_dir`` (config, checkpoints, replay) and in one MLflow run.
``resume=<run dir | checkpoint dir | MLflow run id>`` continues it where it stopped.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, compose_config, run_cli  # noqa: E402

OVERRIDES_FILE = "overrides.txt"


def resolve_run_dir(resume: str, uri: str | None) -> Path:
    """A run dir from a path (run dir or one of its checkpoints) or an MLflow run id."""
    path = Path(resume)
    if path.exists():
        for cand in (path, *path.parents):
            if (cand / OVERRIDES_FILE).exists():
                return cand
        raise ConfigError(f"resume={resume!r} is not inside a run dir (no {OVERRIDES_FILE})")
    from dreamer_trl.tracking import run_dir_of

    found = run_dir_of(resume, uri)
    if found is None:
        raise ConfigError(
            f"resume={resume!r} is neither a path nor an MLflow run id with a run dir"
        )
    return Path(found)


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """``saved`` then ``new``, dropping a saved override whose key ``new`` sets again."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in saved if o.split("=", 1)[0] not in keys] + new


def save_overrides(run_dir: Path, overrides: list[str]) -> None:
    (run_dir / OVERRIDES_FILE).write_text("\n".join(overrides) + "\n")


def name_after_task(overrides: list[str]) -> list[str]:
    """``env.task=Acrobot-v1`` on the cartpole config names the run dir, the experiment and
    the plots after the task (``acrobot_v1``), not after the config; ``env.name=`` wins."""
    keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("env.task=")), None)
    if task is None or "env.name" in keys:
        return overrides
    return [*overrides, f"env.name={re.sub(r'[^0-9a-z]+', '_', task.lower()).strip('_')}"]


def main(argv: list[str]) -> int:
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    overrides = [a for a in argv if not a.startswith("resume=")]
    if resume:
        probe = compose_config([o for o in overrides if o.startswith("tracking.")])
        run_dir = resolve_run_dir(resume, probe.tracking.uri)
        saved = (run_dir / OVERRIDES_FILE).read_text().split()
        overrides = merge_overrides(saved, overrides)
    cfg = compose_config(name_after_task(overrides))
    if not resume:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        run_dir = Path(cfg.run_dir or f"runs/{cfg.env.name}/{stamp}_seed{cfg.seed}")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_overrides(run_dir, overrides)

    from dreamer_trl.tracking import Tracker
    from dreamer_trl.trainer import Trainer, config_params, install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    trainer = Trainer(cfg, run_dir)
    if resume:  # a refused checkpoint (other model size, corrupt) raises before any write
        trainer.load(run_dir)
        print(f"resumed {run_dir} at env step {trainer.counters['env_steps']}", flush=True)
        # Kept only once the checkpoint is accepted, so that a later plain resume repeats
        # them (a longer budget, another thread count) instead of silently dropping them.
        save_overrides(run_dir, overrides)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    tracker = Tracker(
        cfg.tracking.experiment or cfg.env.name,
        run_name=run_dir.name,
        tracking_uri=cfg.tracking.uri,
        run_id=trainer.mlflow_run_id,
        enabled=cfg.tracking.enabled,
        tags={"run_dir": str(run_dir.resolve())},
    )
    trainer.mlflow_run_id = tracker.run_id
    if not resume:
        tracker.log_params(config_params(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
    print(
        f"run dir {run_dir} | mlflow run {tracker.run_id} | {trainer.agent.num_params():,} "
        f"params | device {trainer.device}",
        flush=True,
    )
    result = trainer.train(tracker)
    if trainer.returns:
        from dreamer_trl.tracking import plot_learning_curve

        steps, rets = zip(*trainer.returns)
        png = plot_learning_curve(
            steps, rets, title=cfg.env.name, path=run_dir / "learning_curve.png"
        )
        tracker.log_artifact(png)
    tracker.close("FINISHED" if result["status"] == "FINISHED" else "KILLED")
    print(
        f"{result['status'].lower()}: {result['env_steps']} env steps, {result['updates']} "
        f"updates; checkpoint {result['checkpoint']}",
        flush=True,
    )
    return 0 if result["status"] == "FINISHED" else 130


if __name__ == "__main__":
    sys.exit(run_cli(main))
