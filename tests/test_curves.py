"""pipelines/curves.py: a run's metrics as window means at fixed env steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamer_trl.tracking import Tracker  # noqa: E402
from pipelines import curves  # noqa: E402
from pipelines.common import ConfigError  # noqa: E402


def test_window_means_skip_empty_windows_and_label_the_partial_last():
    points = {
        "eval/return": [(10, 1.0), (30, 3.0)],
        "train/loss_rec": [(2, 4.0), (9, 2.0), (10, 6.0), (11, float("nan")), (34, 5.0)],
    }
    # (0, 10]: eval 1, rec (4+2+6)/3; (10, 20]: only a NaN -> left out; (20, 30]: eval 3;
    # (30, 34]: rec 5, labelled 34.
    assert curves.table(points, every=10) == [[10, 1.0, 4.0], [30, 3.0, None], [34, None, 5.0]]
    text = curves.markdown(list(points), curves.table(points, every=10))
    assert text.splitlines()[0] == "| env step | eval/return | train/loss_rec |"
    assert text.splitlines()[3] == "| 30 | 3 | — |"


def test_a_run_id_prints_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    with Tracker("curves", run_name="r") as tracker:
        for step in (500, 1000, 1500, 2000):
            tracker.log_metrics({"train/imag_return": step / 100}, step)
        tracker.log_metrics({"eval/return": 42.0}, 2000)
    out = tmp_path / "t.md"
    args = [f"run={tracker.run_id}", "every=1000", "keys=eval/return,train/imag_return"]
    assert curves.main([*args, f"out={out}"]) == 0
    assert "| 1,000 | — | 7.5 |\n| 2,000 | 42 | 17.5 |\n" in capsys.readouterr().out
    assert out.read_text().endswith("| 2,000 | 42 | 17.5 |\n")
    with pytest.raises(ConfigError, match="logged no 'train/loss_rec'; it has: eval/return"):
        curves.main([f"run={tracker.run_id}", "keys=train/loss_rec"])
    with pytest.raises(ConfigError, match="every='0' must be a positive"):
        curves.main([f"run={tracker.run_id}", "every=0"])
    with pytest.raises(ConfigError, match="is not in the store"):
        curves.main(["run=" + "0" * 32])
