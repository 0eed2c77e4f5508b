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


def test_plot_overlays_reference_mean_and_seed_range(tmp_path, monkeypatch):
    import gzip

    from matplotlib.figure import Figure

    scores = tmp_path / "scores.json.gz"
    seeds = [
        {"task": "dmc_toy", "seed": s, "xs": [0, 2000, 4000], "ys": [s, 10 + s, 20 + s]}
        for s in (0, 4)
    ]
    with gzip.open(scores, "wt") as f:
        json.dump(seeds, f)
    monkeypatch.setattr(bench_learn, "RESULTS", tmp_path)
    result = fake_result("toy", 0) | {"config": {"reference": {"file": str(scores), "task": "toy"}}}
    saved = []
    real_savefig = Figure.savefig

    def keep_figure(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    bench_learn.plot_task("toy", [result])
    ax = saved[0].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "dreamer_trl seed 0",
        "DreamerV3 reference (mean of seeds)",
        "reference seeds' range",
    ]
    mean = ax.lines[1].get_ydata()
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    # budget 3000 (x 1.05): the reference's 4000 is cut; mean of seeds 0 and 4 = x/200 + 2
    assert max(ax.lines[1].get_xdata()) <= 3150
    assert min(mean) == 2 and min(band) == 0 and max(band) <= 15 + 4
