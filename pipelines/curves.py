"""A run's curves at fixed env steps, as a Markdown table: `python pipelines/curves.py
run=<run dir | checkpoint | MLflow run id> [every=10000] [keys=eval/return,train/imag_return]
[out=<file.md>]`.

Row ``s`` holds, for each key, the mean of the points logged in the window (s − every, s]
(an eval's points sit at its eval steps, so its cell is that eval); "—" where none were,
and windows with no point at all are left out.
The default keys are the ones that say whether a run learns and why not: real returns
(eval and training episodes), the imagined return the actor climbs, its return scale and
entropy, and the world model's reconstruction and dynamics losses. The store is
``$MLFLOW_TRACKING_URI`` or the default ``sqlite:///mlflow.db``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

KEYS = (
    "eval/return",
    "train/episode_return",
    "train/imag_return",
    "train/return_scale",
    "train/actor_entropy",
    "train/loss_rec",
    "train/loss_dyn",
)


def parse(argv: list[str]) -> dict:
    opts = key_values(argv, {"run": "", "every": "10000", "keys": ",".join(KEYS), "out": ""})
    if not opts["run"]:
        raise ConfigError("run=<run dir | checkpoint | MLflow run id> is required")
    try:
        every = int(opts["every"])
    except ValueError:
        every = 0
    if every <= 0:
        raise ConfigError(f"every={opts['every']!r} must be a positive number of env steps")
    keys = [k for k in opts["keys"].split(",") if k]
    return {"run": opts["run"], "every": every, "keys": keys, "out": opts["out"]}


def run_id_of(run: str) -> str:
    """The MLflow run id of a run dir or checkpoint (its checkpoint records it), or ``run``
    itself when it is no path and looks like a run id."""
    from dreamer_trl.tracking import is_run_id

    if not Path(run).expanduser().exists() and is_run_id(run):
        return run
    import torch

    from dreamer_trl.checkpoint import find_checkpoint

    state = torch.load(find_checkpoint(run) / "state.pt", map_location="cpu", weights_only=False)
    if not state.get("mlflow_run_id"):
        raise ConfigError(f"run={run!r}: its checkpoint names no MLflow run (tracking was off)")
    return state["mlflow_run_id"]


def history(run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(step, value)]`` from the store; ConfigError for a key the run lacks."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dreamer_trl.tracking import default_tracking_uri

    client = MlflowClient(tracking_uri=default_tracking_uri())
    try:
        logged = client.get_run(run_id).data.metrics  # the latest value of each key
    except MlflowException:
        raise ConfigError(
            f"run {run_id} is not in the store {default_tracking_uri()} "
            "(set MLFLOW_TRACKING_URI to the store it was logged to)"
        ) from None
    missing = [k for k in keys if k not in logged]
    if missing:
        has = ", ".join(sorted(logged))
        raise ConfigError(f"run {run_id} logged no {missing[0]!r}; it has: {has}")
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def table(points: dict[str, list[tuple[int, float]]], every: int) -> list[list[float | None]]:
    """Rows ``[step, mean of each key in (step - every, step]]``, one per window that has a
    point, None where a key has none. The last window ends at the last logged step (a run
    still going: its row is labelled with how far it got)."""
    last = max((s for pts in points.values() for s, _ in pts), default=0)
    rows = []
    for end in range(every, last + every, every):
        row: list[float | None] = [min(end, last)]
        for pts in points.values():
            vals = [v for s, v in pts if end - every < s <= end and math.isfinite(v)]
            row.append(sum(vals) / len(vals) if vals else None)
        if any(v is not None for v in row[1:]):
            rows.append(row)
    return rows


def markdown(keys: list[str], rows: list[list[float | None]]) -> str:
    def cell(v: float | None) -> str:
        return "—" if v is None else f"{v:.4g}"

    lines = ["| env step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {int(r[0]):,} | " + " | ".join(cell(v) for v in r[1:]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    opts = parse(argv)
    run_id = run_id_of(opts["run"])
    text = markdown(opts["keys"], table(history(run_id, opts["keys"]), opts["every"]))
    print(f"MLflow run {run_id}, means over windows of {opts['every']:,} env steps\n")
    print(text, end="")
    if opts["out"]:
        Path(opts["out"]).write_text(text)
        print(f"\nwritten to {opts['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
