"""make bench's options: which devices it benchmarks, and clear errors for bad ones; and its
replay section (issue 20) on a small buffer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import bench  # noqa: E402
from pipelines.common import ConfigError  # noqa: E402


def test_devices_default_to_what_is_visible():
    expected = ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
    assert bench.parse_options([])["devices"] == expected


def test_devices_keep_a_fixed_order():
    assert bench.parse_devices("cpu") == ["cpu"]
    if torch.cuda.is_available():
        assert bench.parse_devices("gpu,cpu") == ["cpu", "gpu"]


@pytest.mark.parametrize("value", ["tpu", "cpu,tpu", ","])
def test_unknown_device_names_the_valid_ones(value):
    with pytest.raises(ConfigError, match="valid are auto, none or a list of cpu, gpu"):
        bench.parse_devices(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda_is_an_error_not_a_cpu_run():
    with pytest.raises(ConfigError, match="no CUDA device"):
        bench.parse_options(["devices=gpu"])


def test_acting_switch_is_a_bool():
    assert bench.parse_options(["acting=false"])["acting"] is False


def test_race_times_each_contender_cold_then_warm():
    calls = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    warm, cold = bench.race(contenders, rounds=3, warmup=1, device="cpu")
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert [len(v) for v in (*warm.values(), *cold.values())] == [3, 3, 3, 3]


def test_race_without_rewarm_times_each_call_once():
    calls = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    warm, cold = bench.race(contenders, rounds=2, warmup=0, device="cpu", rewarm=False)
    assert calls == ["a", "b", "a", "b"]
    assert warm == cold


def test_rewarm_switch_is_a_bool():
    assert bench.parse_options([])["rewarm"] is True
    assert bench.parse_options(["rewarm=false"])["rewarm"] is False


def test_devices_none_skips_the_update_benchmark():
    assert bench.parse_devices("none") == []


def test_new_switches_parse():
    opts = bench.parse_options(["torchrl=false", "quick=1", "replay_sizes=5000", "replay_pixels=0"])
    assert opts["torchrl"] is False and opts["quick"] is True
    assert opts["replay_sizes"] == "5000" and opts["replay_pixels"] == 0


def test_replay_row_times_every_variant_and_the_old_path_rebuilds(monkeypatch):
    from torchrl.data.replay_buffers.samplers._trajectory import _FragmentedTrajectoryIndex

    rebuilds = []
    original = _FragmentedTrajectoryIndex._full_rebuild
    monkeypatch.setattr(
        _FragmentedTrajectoryIndex,
        "_full_rebuild",
        lambda self, *a: (rebuilds.append(1), original(self, *a))[1],
    )
    row = bench.replay_row("proprio", 400, list(bench.REPLAY_VARIANTS), rounds=1)
    assert row["obs"] == "proprio" and row["stored_steps"] == 400
    assert set(row["variants"]) == {"before", "slice_direct", "after"}
    for timed in row["variants"].values():
        for parts in (timed["warm"], timed["cold"]):
            times = {"extend_ms", "sample_ms", "write_back_ms", "total_ms"}
            assert times | {"minor_faults_per_update", "major_faults_per_update"} == set(parts)
            assert all(parts[k] > 0 for k in times)
    # 'before' rebuilds after every write-back (16 per cycle); the others never do
    assert len(rebuilds) >= bench.UPDATES_PER_EXTEND
