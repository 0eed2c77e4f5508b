"""make bench's options: which devices it benchmarks, and clear errors for bad ones."""

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
    with pytest.raises(ConfigError, match="valid are auto or a list of cpu, gpu"):
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
