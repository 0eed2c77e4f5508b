"""pipelines/offline_result.py: an online run and an offline run on its replay, side by
side at equal update counts (issue 17 item 4), from real tiny runs tracked in MLflow."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tiny import train_tiny  # noqa: E402

from pipelines import offline_result  # noqa: E402
from pipelines.common import ConfigError  # noqa: E402


def test_offline_result_reads_both_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracked = ("tracking.enabled=true",)
    online = train_tiny(tmp_path / "on", "cartpole",
                        (*tracked, "train.total_steps=96", "train.eval_every=32"))
    offline = train_tiny(tmp_path / "off", "cartpole", (
        *tracked, "train.offline=true", f"train.dataset={online}", "train.total_updates=6",
        "train.log_every=2", "train.eval_every=2", "train.heldout_every=2",
    ))
    out = tmp_path / "result"
    assert offline_result.main([f"online={online}", f"offline={offline}", f"out={out}"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    on, off = result["online"], result["offline"]
    assert on["env_steps"] == [32, 64, 96] and len(on["updates"]) == 3
    assert on["updates"] == sorted(on["updates"]) and on["updates"][-1] > 0
    assert off["updates"] == [2, 4, 6] and len(off["eval_return"]) == 3
    wm = result["world_model_loss"]
    assert sorted(int(s) for s in wm["heldout"]) == sorted(int(s) for s in wm["train"]) == [2, 4, 6]
    assert result["heldout_every"] == 2 and result["dataset"] == str(online)
    assert out.with_suffix(".png").stat().st_size > 0


def test_an_online_run_without_mlflow_history_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = train_tiny(tmp_path, "cartpole", ("train.eval_every=32",))  # tracking disabled
    with pytest.raises(ConfigError) as err:
        offline_result.main([f"online={run}", f"offline={run}", f"out={tmp_path / 'r'}"])
    assert "\n" not in str(err.value) and "MLflow" in str(err.value)
    with pytest.raises(ConfigError, match="online=<run dir> and offline=<run dir>"):
        offline_result.main([f"online={run}"])
