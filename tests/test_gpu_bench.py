"""The first-GPU check (pipelines/gpu_bench.sh + gpu_check.py, issue 20) dry-run on the CPU,
so it cannot rot before a GPU is lent: the script's plumbing, the parity method, the kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines import device_kit, gpu_check  # noqa: E402
from pipelines.bench import TINY  # noqa: E402

SCRIPT = ROOT / "pipelines" / "gpu_bench.sh"


def run_script(out: Path, timeout: float, **env: str) -> tuple[int, dict, str]:
    """The script as the device would run it, on the CPU: (exit code, summary, output)."""
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "QUICK": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "KIT": str(out / "no_kit"),  # this venv has the packages: nothing to install
        **env,
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout
    )
    summary = out / "summary.json"
    return done.returncode, json.loads(summary.read_text()), done.stdout + done.stderr


def test_dry_run_of_preflight_and_sync_writes_their_json(tmp_path):
    rc, summary, output = run_script(tmp_path, 300, STEPS="preflight sync")
    assert rc == 0, output
    assert summary["ok"] and [s["status"] for s in summary["steps"]] == ["ok", "ok"]
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert pre["torch"] == torch.__version__ and pre["packages"]["numpy"]
    assert pre["checks"] == {"device_usable": True}
    sync = json.loads((tmp_path / "sync.json").read_text())
    assert sync["status"] == "skipped" and "CUDA" in sync["note"]
    assert "===== preflight" in (tmp_path / "log.txt").read_text()


def test_a_step_without_time_left_is_recorded_and_fails_the_run(tmp_path):
    rc, summary, _ = run_script(tmp_path, 60, STEPS="preflight", TOTAL_S="5")
    assert rc == 1 and not summary["ok"]
    assert summary["steps"] == [{"step": "preflight", "status": "skipped", "note": "no time left"}]


def test_fixed_noise_makes_draws_repeat_on_any_device():
    with gpu_check.fixed_noise(3):
        first = (torch.rand(4), torch.randn(2, 3), torch.randn_like(torch.zeros(5)))
    torch.rand(100)  # the global generator moves; the fixed noise does not follow it
    with gpu_check.fixed_noise(3):
        again = (torch.rand(4), torch.randn(2, 3), torch.randn_like(torch.zeros(5)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.rand(1).shape == (1,)  # the real functions are back


def test_parity_of_two_cpu_updates_is_exact_with_fixed_noise():
    cpu, other = gpu_check._update_pair(TINY, 2, 8, "cpu", "float32")
    row = gpu_check._compare(cpu, other, gpu_check.TOLERANCE["float32"])
    assert row["pass"] and row["worst_loss_rel"] == 0 and row["grad_rel"] == 0
    assert {"loss_rec", "loss_dyn", "loss_policy", "loss_value"} <= set(row["losses"])


def test_device_kit_resolves_dependencies_and_leaves_torch_out():
    pins = device_kit.closure()
    assert {"torchrl", "tensordict", "numpy", "cloudpickle", "packaging", "pyyaml"} <= set(pins)
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "gymnasium"} <= set(pins)
    assert not any(device_kit.PROVIDED.match(name) for name in pins)
    assert pins["torchrl"] == "0.14.1"


@pytest.mark.slow
def test_whole_script_dry_run_on_cpu(tmp_path):
    """Every step, tiny sizes: 4-8 min on the shared 2-core box (trainer: three train.py)."""
    # Limits for a shared, busy CPU (the device's are sized for its 16 idle cores).
    limits = dict(TOTAL_S="1800", T_PREFLIGHT="120", T_PARITY="240", T_TRAINER="600",
                  T_RUN="200", T_BENCH="400", T_REPLAY="200", T_SWITCHES="300")
    rc, summary, output = run_script(tmp_path, 1900, **limits)
    assert rc == 0, output
    steps = ["preflight", "parity", "sync", "trainer", "bench", "replay", "switches"]
    assert [s["step"] for s in summary["steps"]] == steps
    switches = summary["switches"]["ms_per_update"]
    assert set(switches) == {"default", "matmul_high", "replay_step", "replay_step_prefetch"}
    assert all(ms > 0 for ms in switches.values())
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["float32"]["pass"] and parity["bfloat16"]["pass"]
    trainer = json.loads((tmp_path / "trainer.json").read_text())
    runs = ("run", "resume", "all_on_device")
    assert [trainer[k]["checkpoint_env_steps"] for k in runs] == [64, 96, 64]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["quick"] and bench["cpu"]["update_seconds"]["ours_eager"] > 0
    replay = json.loads((tmp_path / "replay.json").read_text())
    assert replay["replay"]["rows"][0]["variants"]["after"]["warm"]["total_ms"] > 0
    # The device tool brings back at most 8 files, none in a folder more than 2 down.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == tmp_path for p in files)
