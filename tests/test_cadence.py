"""The loop's bookkeeping (dreamer_trl/cadence.py): the log line and the schedule."""

import math

import pytest
import torch
from tensordict import TensorDict

from dreamer_trl.cadence import Every, Means, Phases, log_line, shown_return

LOGGED = {
    "train/loss_rec": 2.371,
    "train/loss_dyn": 6.5604,
    "train/entropy": 1.0,  # not a loss: not on the line
    "perf/sec_per_step/update": 0.41234,
    "perf/fps": 2.4,
}


def test_online_line_counts_steps_updates_and_the_last_return():
    line = log_line({"env_steps": 17008, "updates": 15931}, 0.84, -12.34, LOGGED)
    assert line == (
        "step 17008 updates 15931 fps 0.8 return -12.3 rec=2.37 dyn=6.56 | s/step update=0.412"
    )


def test_no_episode_ended_yet_is_a_dash_not_nan():
    line = log_line({"env_steps": 16, "updates": 1}, 3.0, math.nan, LOGGED)
    assert "return - " in line and "nan" not in line
    assert shown_return(math.nan) == "-" and shown_return(499.96) == "500.0"


def test_offline_line_counts_updates_and_their_rate():
    logged = {**LOGGED, "heldout/world_model": 3.14159}
    line = log_line({"env_steps": 0, "updates": 400}, 2.345, math.nan, logged, offline=True)
    assert line.startswith("updates 400 updates/s 2.35 rec=2.37 dyn=6.56 heldout=3.14")
    assert "step " not in line.split("|")[0] and "return" not in line and "fps" not in line


def test_every_fires_once_per_multiple_from_where_the_run_resumed():
    due = Every(1000, start=16192)  # a resumed run: next at 17000, not at 16192
    assert [x for x in range(16192, 19500, 16) if due(x)] == [17008, 18000, 19008]
    never = Every(0, start=0)
    assert not any(never(x) for x in range(0, 10_000, 100))


def test_means_average_between_pops():
    means = Means()
    for v in (1.0, 2.0, 6.0):
        means.add(TensorDict({"loss_rec": torch.tensor(v)}, []))
    assert float(means.pop()["loss_rec"]) == pytest.approx(3.0)
    assert means.pop() == {}  # an empty interval: nothing to report


def test_phases_report_seconds_per_env_step_since_the_last_report():
    phases = Phases(env_steps=100)
    phases.seconds = {"update": 8.0, "sample": 0.4}  # as the timed blocks add them up
    assert phases.pop(116) == {
        "perf/sec_per_step/update": 0.5,
        "perf/sec_per_step/sample": 0.025,
    }
    assert phases.pop(132) == {} and phases.since == 132
