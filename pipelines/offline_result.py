"""The offline result (issue 17): an offline run against the online run whose replay it
trained on, at equal update counts.

    .venv/bin/python pipelines/offline_result.py online=<run dir> offline=<run dir> \
        out=results/offline/<name>

Reads both runs' latest checkpoints (eval returns) and their MLflow metric histories
(the online run's update count at each eval; the offline run's training and held-out
world-model losses), and writes <out>.json and <out>.png: eval return against updates
for both runs, and the offline run's world-model loss on its training batches and on
its held-out episodes (``train.heldout_every``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.bench import parse_options  # noqa: E402
from pipelines.common import ConfigError, run_cli  # noqa: E402

OPTIONS = {"online": "", "offline": "", "out": "results/offline/result"}


def run_record(run_dir: str) -> dict:
    """Eval returns, counters, commit and MLflow run id of a run's latest checkpoint."""
    from dreamer_trl.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

    try:
        state = load_checkpoint(find_checkpoint(run_dir), verify=False)
    except CheckpointError as err:
        raise ConfigError(f"run {run_dir}: {err}") from None
    return {
        "run_dir": run_dir,
        "evals": [(int(s), float(r)) for s, r in state.get("eval_returns", [])],
        "counters": state["counters"],
        "commit": state.get("commit", "unrecorded"),
        "mlflow_run_id": state.get("mlflow_run_id"),
        "config": state["config"],
    }


def history(client, run_id: str, key: str) -> dict[int, float]:
    """step → value of one MLflow metric (the last value logged at a step)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def world_model(client, run_id: str, prefix: str) -> dict[int, float]:
    """step → the sum of the five world-model loss terms logged under ``prefix``."""
    from dreamer_trl.offline import WORLD_MODEL_LOSSES

    parts = [history(client, run_id, f"{prefix}{k}") for k in WORLD_MODEL_LOSSES]
    steps = sorted(set.intersection(*(set(p) for p in parts))) if parts[0] else []
    return {s: sum(p[s] for p in parts) for s in steps}


def collect(online: dict, offline: dict) -> dict:
    from mlflow.tracking import MlflowClient

    from dreamer_trl.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    for run in (online, offline):
        if not run["mlflow_run_id"]:
            raise ConfigError(f"run {run['run_dir']} was not tracked in MLflow: its metric "
                              "history is needed (run it with tracking.enabled=true)")
    updates_at = history(client, online["mlflow_run_id"], "perf/updates")
    missing = [s for s, _ in online["evals"] if s not in updates_at]
    if missing:
        raise ConfigError(
            f"online run {online['run_dir']}: no perf/updates logged at eval steps {missing} "
            f"in MLflow run {online['mlflow_run_id']} (is this the store it logged to?)"
        )
    oid = offline["mlflow_run_id"]
    return {
        "online": {
            "updates": [int(updates_at[s]) for s, _ in online["evals"]],
            "env_steps": [s for s, _ in online["evals"]],
            "eval_return": [r for _, r in online["evals"]],
        },
        "offline": {
            "updates": [s for s, _ in offline["evals"]],
            "eval_return": [r for _, r in offline["evals"]],
        },
        "world_model_loss": {
            "train": world_model(client, oid, "train/"),
            "heldout": history(client, oid, "heldout/world_model"),
        },
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ret, wm) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("online", "o-"), ("offline", "s-")):
        r = result[name]
        ret.plot(r["updates"], r["eval_return"], style, label=name)
    ret.set(xlabel="updates", ylabel="eval return (mean of 10 episodes)",
            title=f"{result['task']}: online vs offline on its replay")
    for name, style in (("train", "-"), ("heldout", "--")):
        curve = result["world_model_loss"][name]
        xs = sorted(int(s) for s in curve)
        wm.plot(xs, [curve[x] for x in xs], style, label=f"{name} batches")
    wm.set(xlabel="updates", ylabel="world-model loss (rec+rew+con+dyn+rep)",
           title="offline run: world-model loss")
    for ax in (ret, wm):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    opts = parse_options(argv, OPTIONS)
    if not (opts["online"] and opts["offline"]):
        raise ConfigError("both online=<run dir> and offline=<run dir> are needed")
    online, offline = run_record(opts["online"]), run_record(opts["offline"])
    result = {
        "task": online["config"]["env"]["task"],
        "dataset": offline["config"]["train"].get("dataset"),
        "heldout_every": offline["config"]["train"].get("heldout_every", 0),
        "dataset_steps": offline["counters"].get("dataset_steps"),
        **collect(online, offline),
        "commits": {"online": online["commit"], "offline": offline["commit"]},
        "seeds": {"online": online["config"]["seed"], "offline": offline["config"]["seed"]},
        "wall_seconds": {
            "online": online["counters"].get("wall_seconds"),
            "offline": offline["counters"].get("wall_seconds"),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / opts["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for name in ("online", "offline"):
        pairs = zip(result[name]["updates"], result[name]["eval_return"])
        print(f"{name}: " + " → ".join(f"{r:.0f} ({u})" for u, r in pairs))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
