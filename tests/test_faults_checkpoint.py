"""Checkpoints cost what the data costs and refuse damage by name (issue 15, items 3-5).

Faults injected: a truncated and a bit-flipped replay file, a full disk (a ``disk_usage``
stand-in and an ENOSPC raised mid-write), a checkpoint written by the older format.
"""

from __future__ import annotations

import errno
import json
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from dreamer_trl import checkpoint as ck
from dreamer_trl.checkpoint import (
    CheckpointError,
    DiskFullError,
    load_checkpoint,
    save_checkpoint,
    verified_checkpoint,
)
from dreamer_trl.replay import StepReplay

D, S, C = 32, 4, 4  # deter, stoch groups, classes (small stand-ins for size1m's 512, 32, 4)


def collector_batch(n: int, seed: int, done_at: tuple[int, ...] = ()) -> TensorDict:
    """A single-env collector batch [n] as the acting policy writes it."""
    g = torch.Generator().manual_seed(seed)
    done = torch.zeros(n, 1, dtype=torch.bool)
    done[list(done_at)] = True
    stoch = torch.nn.functional.one_hot(torch.randint(C, (n, S), generator=g), C).float()
    nxt = TensorDict(
        {
            "obs": torch.randn(n, 3, generator=g),
            "reward": torch.randn(n, 1, generator=g),
            "done": done,
            "terminated": done.clone(),
            "deter": torch.rand(n, D, generator=g) * 2 - 1,  # GRU states lie in [-1, 1]
            "stoch": stoch,
        },
        [n],
    )
    return TensorDict(
        {
            "obs": torch.randn(n, 3, generator=g),
            "action": torch.randn(n, 2, generator=g),
            "reward_in": torch.randn(n, 1, generator=g),
            "is_init": torch.zeros(n, 1, dtype=torch.bool),
            "next": nxt,
        },
        [n],
    )


def make_replay(scratch: Path, capacity: int = 1000, **kw) -> StepReplay:
    return StepReplay(capacity, 2, 9, ["obs"], scratch_dir=str(scratch), **kw)


def filled(scratch: Path, steps: int = 300, **kw) -> StepReplay:
    replay = make_replay(scratch, **kw)
    for i in range(steps // 50):
        replay.extend(collector_batch(50, seed=i, done_at=(49,) if i % 3 == 2 else ()))
    return replay


def state(step: int) -> dict:
    return {"counters": {"env_steps": step}, "w": torch.arange(10.0)}


def rows(replay: StepReplay) -> TensorDict:
    return replay.buffer.storage._storage[: len(replay)].clone()


# --------------------------------------------------------------------------- compact replay


def test_latents_are_stored_in_16_bits_within_tolerance(tmp_path: Path) -> None:
    replay = make_replay(tmp_path / "s")
    batch = collector_batch(50, seed=0)
    replay.extend(batch)
    stored = replay.buffer.storage._storage
    assert stored["deter"].dtype == torch.float16 and stored["stoch"].dtype == torch.float16
    err = (stored["deter"][:50].float() - batch["next", "deter"]).abs().max()
    assert err <= 2**-11  # float16's half-ulp on [-1, 1]
    assert torch.equal(stored["stoch"][:50].float(), batch["next", "stoch"])  # one-hot: exact


def test_dump_holds_only_the_filled_rows(tmp_path: Path) -> None:
    """A 100k-capacity replay holding 300 steps writes ~300 steps, not 100k."""
    replay = filled(tmp_path / "s", capacity=100_000)
    replay.dumps(tmp_path / "dump")
    written = sum(p.stat().st_size for p in (tmp_path / "dump").rglob("*") if p.is_file())
    content = replay.nbytes()
    assert content == len(replay) * replay.bytes_per_step() > 0
    assert written <= 1.25 * content, (written, content)


def test_live_scratch_grows_with_the_data(tmp_path: Path) -> None:
    """The memmap files are sized at capacity but sparse: blocks follow the rows written."""
    replay = filled(tmp_path / "s", capacity=200_000)
    files = [p for p in (tmp_path / "s").rglob("*.memmap")]
    apparent = sum(p.stat().st_size for p in files)
    used = sum(p.stat().st_blocks * 512 for p in files)
    assert apparent >= 200_000 * replay.bytes_per_step() * 0.99
    assert used < 0.05 * apparent, (used, apparent)


@pytest.mark.parametrize("capacity", [1000, 250])  # 250: the circular storage has wrapped
def test_dump_roundtrip(tmp_path: Path, capacity: int) -> None:
    replay = filled(tmp_path / "a", capacity=capacity)
    replay.dumps(tmp_path / "dump")
    back = make_replay(tmp_path / "b", capacity=capacity)
    back.loads(tmp_path / "dump")
    assert len(back) == len(replay)
    assert (rows(back) == rows(replay)).all()
    assert back.buffer._writer._cursor == replay.buffer._writer._cursor
    assert back.buffer.storage._last_cursor == (replay.buffer._writer._cursor - 1) % capacity
    back.load_state_dict(replay.state_dict())
    assert back.sample().shape == (2, 9)


def test_legacy_torchrl_dump_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before the compact format hold ReplayBuffer.dumps output."""
    replay = filled(tmp_path / "a")
    replay.buffer.dumps(tmp_path / "legacy")
    back = make_replay(tmp_path / "b")
    back.loads(tmp_path / "legacy")
    assert (rows(back) == rows(replay)).all()


def test_dump_of_another_capacity_is_refused(tmp_path: Path) -> None:
    filled(tmp_path / "a", capacity=1000).dumps(tmp_path / "dump")
    with pytest.raises(ValueError, match="capacity 1000"):
        make_replay(tmp_path / "b", capacity=500).loads(tmp_path / "dump")


# --------------------------------------------------------------------------- integrity


def saved_run(tmp_path: Path, steps=(100, 200)) -> tuple[Path, StepReplay]:
    replay = filled(tmp_path / "scratch")
    for step in steps:
        save_checkpoint(tmp_path / "run", state(step), replay_buffer=replay, keep=3)
    return tmp_path / "run", replay


def test_manifest_records_every_file(tmp_path: Path) -> None:
    run, _ = saved_run(tmp_path, steps=(100,))
    ckpt = run / "checkpoints" / "step_100"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    assert "replay/steps/deter.memmap" in files
    assert all(v["bytes"] == (ckpt / k).stat().st_size for k, v in files.items())


def test_truncated_replay_file_is_refused_by_name(tmp_path: Path) -> None:
    run, _ = saved_run(tmp_path)
    path = run / "checkpoints" / "step_200" / "replay" / "steps" / "deter.memmap"
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(CheckpointError, match="replay/steps/deter.memmap has .* bytes"):
        load_checkpoint(run, replay_buffer=make_replay(tmp_path / "b"))


def test_bit_flip_is_refused_by_name(tmp_path: Path) -> None:
    run, _ = saved_run(tmp_path)
    path = run / "checkpoints" / "step_200" / "replay" / "steps" / "stoch.memmap"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="stoch.memmap fails its checksum"):
        verified_checkpoint(run)


def test_fallback_to_the_previous_checkpoint_only_when_asked(tmp_path: Path) -> None:
    run, replay = saved_run(tmp_path)
    os.truncate(run / "checkpoints" / "step_200" / "state.pt", 10)
    with pytest.raises(CheckpointError, match="step_200 is damaged: state.pt"):
        verified_checkpoint(run)
    ckpt = verified_checkpoint(run, fallback=True)
    assert ckpt.name == "step_100"
    back = make_replay(tmp_path / "b")
    assert load_checkpoint(ckpt, replay_buffer=back)["counters"]["env_steps"] == 100
    assert (rows(back) == rows(replay)).all()


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path: Path, caplog) -> None:
    run, _ = saved_run(tmp_path, steps=(100,))
    (run / "checkpoints" / "step_100" / "manifest.json").unlink()
    assert load_checkpoint(run)["counters"]["env_steps"] == 100
    assert "not verified" in caplog.text


# --------------------------------------------------------------------------- disk space

Usage = namedtuple("Usage", "total used free")


def test_full_disk_refuses_the_write_and_keeps_the_latest(tmp_path: Path, monkeypatch) -> None:
    run, replay = saved_run(tmp_path, steps=(100,))
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda _: Usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(run, state(200), replay_buffer=replay)
    msg = str(info.value)
    assert "\n" not in msg
    assert "step_200 needs about" in msg and "0.0 MiB free" in msg
    assert str(run / "checkpoints") in msg and "step_100 stays the latest" in msg
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_100"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_100"]


def test_enospc_mid_write_is_the_same_one_line_error(tmp_path: Path, monkeypatch) -> None:
    run, replay = saved_run(tmp_path, steps=(100,))

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_manifest", no_space)
    with pytest.raises(DiskFullError, match="disk full: checkpoint step_200"):
        save_checkpoint(run, state(200), replay_buffer=replay)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_100"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_expected_bytes_counts_state_tensors_and_replay(tmp_path: Path) -> None:
    replay = filled(tmp_path / "s")
    st = {"counters": {"env_steps": 1}, "a": torch.zeros(100), "b": [torch.zeros(5, 2)]}
    assert ck.expected_bytes(st, replay) == 400 + 40 + replay.nbytes()


def test_run_stops_with_one_line_before_the_disk_fills(tmp_path, monkeypatch, capsys) -> None:
    """Once the disk cannot hold the next checkpoint plus the replay's growth, the run stops
    (exit 2, one line) with its last checkpoint intact and loadable, instead of SIGBUS."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_pipeline import tiny

    from pipelines import train
    from pipelines.common import run_cli

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    real = shutil.disk_usage

    def usage(path):  # the disk "fills up" once the first checkpoint is written
        if (run / "checkpoints" / "step_32").exists():
            return Usage(10**9, 10**9 - 4096, 4096)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    args = tiny("cartpole", f"run_dir={run}", "train.checkpoint_every=32", "tracking.enabled=false")
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk nearly full: ")
    assert "stopping at env step 48 (latest checkpoint: step_32)" in err[0]
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert load_checkpoint(run)["counters"]["env_steps"] == 32


def test_a_device_replay_needs_tensor_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replay.device=cuda needs replay.storage=tensor"):
        make_replay(tmp_path / "s", storage="memmap", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only torch's message")
def test_cuda_on_a_cpu_only_torch_is_one_line() -> None:
    from dreamer_trl.trainer import resolve_device

    with pytest.raises(ValueError, match="device=cuda but torch .* sees no CUDA device"):
        resolve_device("cuda")
