"""Learning benchmarks: `make bench-learn [TASKS=cartpole,pendulum] [SEEDS=0,1]`.

Each (task, seed) is an ordinary training run through pipelines/train.py with the preset
conf/bench/<task>.yaml (nothing is special-cased), in runs/bench/<task>-seed<k>. A run
dir that already holds a checkpoint is resumed, so a benchmark longer than one sitting
continues where it stopped. Afterwards each run's evaluation curve goes to
results/learning/<task>-seed<k>.json and each task gets a plot, with the published
reference curve overlaid when the preset names one and its file exists.

Options (key=value): tasks=[cartpole,pendulum] seeds=[0] parallel=2 (runs at once; each
uses threads=1) report_only=false (skip training, rebuild JSON/PNG from the run dirs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.common import ConfigError, compose_config, group_options, run_cli  # noqa: E402

RESULTS = ROOT / "results" / "learning"


def parse(argv: list[str]) -> dict:
    opts = {"tasks": ["cartpole", "pendulum"], "seeds": [0], "parallel": 2, "report_only": False}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise ConfigError(f"unknown option {arg!r}; valid: {', '.join(opts)}")
        if key in ("tasks", "seeds"):
            items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
            opts[key] = [int(v) for v in items] if key == "seeds" else items
        elif key == "parallel":
            opts[key] = max(1, int(value))
        else:
            opts[key] = value.lower() in ("1", "true", "yes")
    bad = [t for t in opts["tasks"] if t not in group_options("bench")]
    if bad:
        raise ConfigError(f"unknown task {bad[0]!r}; valid: {', '.join(group_options('bench'))}")
    return opts


def run_dir(task: str, seed: int) -> Path:
    return ROOT / "runs" / "bench" / f"{task}-seed{seed}"


def train_command(task: str, seed: int) -> list[str]:
    rd = run_dir(task, seed)
    if (rd / "checkpoints" / "latest").exists():
        return [sys.executable, str(ROOT / "pipelines" / "train.py"), f"resume={rd}"]
    return [
        sys.executable,
        str(ROOT / "pipelines" / "train.py"),
        f"+bench={task}",
        f"seed={seed}",
        f"run_dir={rd}",
        "train.progress=false",
    ]


def run_all(jobs: list[tuple[str, int]], parallel: int) -> dict:
    """Run the jobs, ``parallel`` at a time; returns wall seconds per job."""
    _init_store()
    pending, running, walls = list(jobs), {}, {}
    (ROOT / "logs").mkdir(exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            task, seed = pending.pop(0)
            log = open(ROOT / "logs" / f"{task}-seed{seed}.log", "a")
            cmd = train_command(task, seed)
            print(f"start {task} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            running[(task, seed)] = (
                subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT),
                time.time(),
            )
        for key, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                walls[key] = time.time() - start
                print(f"done {key[0]} seed {key[1]}: exit {proc.returncode}", flush=True)
                del running[key]
        time.sleep(5)
    return walls


def _init_store() -> None:
    """Create the MLflow store once, so parallel runs don't race to migrate it."""
    from dreamer_trl.tracking import Tracker

    Tracker("bench-init", enabled=True).close()


def write_result(task: str, seed: int) -> dict | None:
    """results/learning/<task>-seed<k>.json from the run's latest checkpoint."""
    import torch

    from dreamer_trl.checkpoint import CheckpointError, find_checkpoint

    try:
        ckpt = find_checkpoint(str(run_dir(task, seed)))
    except CheckpointError:
        print(f"{task} seed {seed}: no checkpoint yet")
        return None
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    evals = state.get("eval_returns", [])
    cfg = state["config"]
    result = {
        "task": task,
        "seed": seed,
        "budget": cfg["train"]["total_steps"],
        "env_steps": state["counters"]["env_steps"],
        "updates": state["counters"]["updates"],
        "steps": [int(s) for s, _ in evals],
        "eval_return": [float(r) for _, r in evals],
        "final_eval_return": float(evals[-1][1]) if evals else None,
        "complete": state["counters"]["env_steps"] >= cfg["train"]["total_steps"],
        "wall_seconds": state["counters"].get("wall_seconds"),
        "commit": state.get("commit", "unrecorded"),
        "date": time.strftime("%Y-%m-%d"),
        "mlflow_run_id": state.get("mlflow_run_id"),
        "config": cfg,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{task}-seed{seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def all_seeds(task: str) -> list[dict]:
    """Every seed's result file for ``task`` (the plot shows them all, not only the seeds
    this invocation ran), in seed order."""
    runs = [json.loads(p.read_text()) for p in RESULTS.glob(f"{task}-seed*.json")]
    return sorted(runs, key=lambda r: r["seed"])


def plot_task(task: str, results: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamer_trl.tracking import reference_overlay

    runs = [r for r in results if r and r["steps"]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(r["steps"], r["eval_return"], marker="o", label=f"dreamer_trl seed {r['seed']}")
    ref = runs[0]["config"].get("reference") or {}
    until = max(r["budget"] for r in runs) * 1.05
    overlay = reference_overlay(ref.get("file"), ref.get("task"), until=until)
    if overlay is not None:
        xs, mean, lo, hi = overlay
        ax.plot(xs, mean, "k--", label="DreamerV3 reference (mean of seeds)")
        ax.fill_between(xs, lo, hi, color="k", alpha=0.12, label="reference seeds' range")
    ax.set(xlabel="env steps", ylabel="eval return (mean of 10 episodes)", title=task)
    ax.grid(alpha=0.3)
    ax.legend()
    path = RESULTS / f"{task}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip()


def main(argv: list[str]) -> int:
    opts = parse(argv)
    for task in opts["tasks"]:
        compose_config([f"+bench={task}"])  # fail early on a broken preset
    jobs = [(t, s) for t in opts["tasks"] for s in opts["seeds"]]
    if not opts["report_only"]:
        run_all(jobs, opts["parallel"])
    for task in opts["tasks"]:
        results = [write_result(task, s) for s in opts["seeds"]]
        png = plot_task(task, all_seeds(task))
        for r in filter(None, results):
            print(
                f"{task} seed {r['seed']}: {r['env_steps']}/{r['budget']} steps, final eval "
                f"return {r['final_eval_return']}"
            )
        if png:
            print(f"plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
