"""make bench-learn's report: a task's plot shows every seed on record, not only the
seeds that one invocation ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import bench_learn  # noqa: E402


def fake_result(task: str, seed: int) -> dict:
    return {
        "task": task,
        "seed": seed,
        "budget": 3000,
        "steps": [1000, 2000, 3000],
        "eval_return": [-1200.0 + 100 * seed, -800.0, -300.0],
        "config": {"reference": {}},
    }


def test_plot_covers_every_seed_on_record(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_learn, "RESULTS", tmp_path)
    for seed in (1, 0):
        (tmp_path / f"pendulum-seed{seed}.json").write_text(
            json.dumps(fake_result("pendulum", seed))
        )
    # another preset whose name starts alike must not be mixed in
    (tmp_path / "pendulum_r256-seed0.json").write_text(json.dumps(fake_result("pendulum_r256", 0)))
    runs = bench_learn.all_seeds("pendulum")
    assert [r["seed"] for r in runs] == [0, 1]
    png = bench_learn.plot_task("pendulum", runs)
    assert png == tmp_path / "pendulum.png" and png.stat().st_size > 0
