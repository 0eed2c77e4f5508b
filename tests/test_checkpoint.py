"""Tests for dreamer_trl.checkpoint: atomic saves, crash safety, replay round trips."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import SliceSampler

from dreamer_trl.checkpoint import (
    CheckpointError,
    capture_rng,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAJ_KEY = ("collector", "traj_ids")
SLICE_LEN = 8


# --------------------------------------------------------------------------- helpers
# (also imported by the crash-test child process, so they must stay module-level)


def make_buffer(scratch_dir: Path, *, existsok: bool = False) -> TensorDictReplayBuffer:
    """The buffer layout the trainer uses: memmap storage + trajectory slices."""
    return TensorDictReplayBuffer(
        storage=LazyMemmapStorage(1000, scratch_dir=scratch_dir, existsok=existsok),
        sampler=SliceSampler(slice_len=SLICE_LEN, traj_key=TRAJ_KEY),
        batch_size=4 * SLICE_LEN,
    )


def make_batch(n: int, first_traj: int, *, start_t: int = 0, traj_len: int = 50) -> TensorDict:
    """``n`` transitions of consecutive trajectories; ``t`` is a global step index."""
    gen = torch.Generator().manual_seed(first_traj * 1000 + start_t)
    t = torch.arange(start_t, start_t + n)
    return TensorDict(
        {
            "observation": torch.randn(n, 3, generator=gen),
            "t": t,
            TRAJ_KEY: first_traj + torch.arange(n) // traj_len,
            ("next", "reward"): torch.randn(n, 1, generator=gen),
            ("next", "done"): (torch.arange(n) % traj_len == traj_len - 1).unsqueeze(-1),
        },
        batch_size=[n],
    )


def make_state(step: int, *, big: bool = False) -> dict:
    """A training-state dict whose tensors are a deterministic function of ``step``."""
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "counters": {"env_steps": step, "updates": step // 10},
        "rng": capture_rng(),
        "meta": {"model": "size1m", "obs_keys": ["observation"], "action_dim": 6},
    }
    if big:  # makes the write slow enough to be caught in the middle
        state["blob"] = torch.full((2_000_000,), float(step))
    return state


def assert_state_equal(got: dict, want: dict) -> None:
    assert got["counters"] == want["counters"]
    assert got["meta"] == want["meta"]
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value)
    got_opt, want_opt = got["optimizer"]["state"], want["optimizer"]["state"]
    for idx, slot in want_opt.items():
        for name, value in slot.items():
            torch.testing.assert_close(got_opt[idx][name], value)


def assert_slices_contiguous(sample: TensorDict) -> None:
    """Every sampled slice must be SLICE_LEN consecutive steps of a single trajectory."""
    slices = sample.reshape(-1, SLICE_LEN)
    assert (slices[TRAJ_KEY] == slices[TRAJ_KEY][:, :1]).all()
    assert (slices["t"].diff(dim=1) == 1).all()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- RNG


def test_rng_roundtrip() -> None:
    rng = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(rng)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    torch.testing.assert_close(first[2], second[2])


# --------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(tmp_path: Path) -> None:
    state = make_state(100)
    ckpt = save_checkpoint(tmp_path, state)

    assert ckpt == tmp_path / "checkpoints" / "step_100"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_100"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 100 and meta["meta"]["model"] == "size1m"
    assert meta["replay"] == "none"
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]

    loaded = load_checkpoint(tmp_path, expected_meta={"model": "size1m", "action_dim": 6})
    assert_state_equal(loaded, state)
    model = torch.nn.Linear(4, 2)
    model.load_state_dict(loaded["model"])  # loads into a fresh module
    restore_rng(loaded["rng"])


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, make_state(step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_20", "step_30"]
    assert load_checkpoint(tmp_path)["counters"]["env_steps"] == 30


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(10))
    state = make_state(10)
    state["counters"]["updates"] = 999
    save_checkpoint(tmp_path, state)
    assert load_checkpoint(tmp_path)["counters"]["updates"] == 999
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_10"]


def test_save_requires_env_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="env_steps"):
        save_checkpoint(tmp_path, {"counters": {}})


def test_stale_tmp_dirs_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    stale = root / f".tmp-step_5-{dead_pid()}"
    (stale / "replay").mkdir(parents=True)
    save_checkpoint(tmp_path, make_state(10))
    assert not stale.exists()


# --------------------------------------------------------------------------- find


def test_find_checkpoint_accepts_all_forms(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(10), keep=5)
    ckpt = save_checkpoint(tmp_path, make_state(20), keep=5)
    assert find_checkpoint(tmp_path) == ckpt
    assert find_checkpoint(str(tmp_path / "checkpoints")) == ckpt
    assert find_checkpoint(ckpt) == ckpt
    assert find_checkpoint(ckpt / "state.pt") == ckpt
    older = tmp_path / "checkpoints" / "step_10"
    assert find_checkpoint(older) == older


def test_find_checkpoint_falls_back_when_latest_is_dangling(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(10), keep=5)
    ckpt = save_checkpoint(tmp_path, make_state(20), keep=5)
    (tmp_path / "checkpoints" / "latest").write_text("step_999\n")
    assert find_checkpoint(tmp_path) == ckpt


def test_find_checkpoint_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        find_checkpoint(missing)
    assert str(missing) in str(info.value) and "state.pt" in str(info.value)
    assert isinstance(info.value, RuntimeError)

    with pytest.raises(CheckpointError, match=f"no checkpoint found in {tmp_path}"):
        find_checkpoint(tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(CheckpointError, match="not state.pt"):
        find_checkpoint(other)


# --------------------------------------------------------------------------- validation


def test_meta_mismatch_names_every_key(tmp_path: Path) -> None:
    state = make_state(10)
    state["meta"]["model"] = "size12m"
    save_checkpoint(tmp_path, state)
    expected = {"model": "size1m", "obs_keys": ("observation",), "action_dim": 4, "env": "x"}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, expected_meta=expected)
    msg = str(info.value)
    assert "checkpoint was trained with model=size12m, this run asks for model=size1m" in msg
    assert "action_dim=6, this run asks for action_dim=4" in msg
    assert "no env recorded" in msg
    assert "obs_keys" not in msg  # tuple vs list of the same names is not a mismatch


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_state_file(tmp_path: Path, damage: str, verify: bool) -> None:
    """The manifest check names the damaged file; without it, torch.load's failure does."""
    ckpt = save_checkpoint(tmp_path, make_state(10))
    path = ckpt / "state.pt"
    data = path.read_bytes()
    payload = {"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}
    path.write_bytes(payload[damage])
    if verify:
        with pytest.raises(CheckpointError, match="is damaged: state.pt ") as info:
            load_checkpoint(tmp_path)
        assert str(ckpt) in str(info.value)
    else:
        with pytest.raises(CheckpointError, match="is corrupt or truncated") as info:
            load_checkpoint(tmp_path, verify=False)
        assert str(path) in str(info.value)


# --------------------------------------------------------------------------- replay buffer


def test_replay_roundtrip_with_wraparound(tmp_path: Path) -> None:
    rb = make_buffer(tmp_path / "scratch_a")
    # 1200 steps into a 1000-slot buffer: the writer wraps, as in a long run.
    for i in range(4):
        rb.extend(make_batch(300, first_traj=6 * i, start_t=300 * i))
    rb.sample()
    save_checkpoint(tmp_path / "run", make_state(1200), replay_buffer=rb)

    rb2 = make_buffer(tmp_path / "scratch_b")
    load_checkpoint(tmp_path / "run", replay_buffer=rb2)
    assert len(rb2) == len(rb) == 1000
    assert (rb2[:] == rb[:]).all()
    assert rb2._writer._cursor == rb._writer._cursor  # new data overwrites the oldest
    for _ in range(20):
        assert_slices_contiguous(rb2.sample())

    # The restored buffer keeps evolving exactly like the original.
    more = make_batch(100, first_traj=100, start_t=5000)
    rb.extend(more)
    rb2.extend(more)
    assert (rb2[:] == rb[:]).all()
    assert_slices_contiguous(rb2.sample())


def test_done_based_slices_respect_write_head_after_load(tmp_path: Path) -> None:
    """TorchRL's loads() forgets the last write position; load_checkpoint restores it.

    Without it, an end_key SliceSampler joins the newest unfinished episode (no done yet)
    to the stale data that follows it in memory.
    """

    def done_buffer(scratch: Path) -> TensorDictReplayBuffer:
        sampler = SliceSampler(slice_len=SLICE_LEN, end_key=("next", "done"), strict_length=True)
        return TensorDictReplayBuffer(
            storage=LazyMemmapStorage(1000, scratch_dir=scratch),
            sampler=sampler,
            batch_size=4 * SLICE_LEN,
        )

    rb = done_buffer(tmp_path / "a")
    rb.extend(make_batch(1000, first_traj=0))
    rb.extend(make_batch(130, first_traj=100, start_t=5000))  # ends mid-episode at slot 129
    save_checkpoint(tmp_path / "run", make_state(1130), replay_buffer=rb)
    rb2 = done_buffer(tmp_path / "b")
    load_checkpoint(tmp_path / "run", replay_buffer=rb2)

    assert rb2._storage._last_cursor_index == rb._storage._last_cursor_index == 129
    torch.manual_seed(0)
    for _ in range(100):
        assert (rb2.sample().reshape(-1, SLICE_LEN)["t"].diff(dim=1) == 1).all()


def test_empty_replay_buffer(tmp_path: Path) -> None:
    rb = make_buffer(tmp_path / "scratch_a")
    ckpt = save_checkpoint(tmp_path / "run", make_state(0), replay_buffer=rb)
    assert json.loads((ckpt / "meta.json").read_text())["replay"] == "empty"
    rb2 = make_buffer(tmp_path / "scratch_b")
    load_checkpoint(tmp_path / "run", replay_buffer=rb2)
    assert len(rb2) == 0


def test_missing_replay_is_an_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(10))
    with pytest.raises(CheckpointError, match="has no replay buffer"):
        load_checkpoint(tmp_path, replay_buffer=make_buffer(tmp_path / "scratch"))


def test_reused_scratch_dir_needs_existsok(tmp_path: Path) -> None:
    """A resumed process that reuses its scratch_dir finds the old memmap files there."""
    scratch = tmp_path / "scratch"
    rb = make_buffer(scratch)
    rb.extend(make_batch(100, first_traj=0))
    save_checkpoint(tmp_path / "run", make_state(100), replay_buffer=rb)

    with pytest.raises(CheckpointError, match="existsok=True"):
        load_checkpoint(tmp_path / "run", replay_buffer=make_buffer(scratch))
    rb2 = make_buffer(scratch, existsok=True)
    load_checkpoint(tmp_path / "run", replay_buffer=rb2)
    assert (rb2[:] == rb[:]).all()


def test_scratch_dir_inside_checkpoints_is_refused(tmp_path: Path) -> None:
    rb = make_buffer(tmp_path / "scratch")
    rb.extend(make_batch(100, first_traj=0))
    save_checkpoint(tmp_path, make_state(100), replay_buffer=rb)
    bad = make_buffer(tmp_path / "checkpoints" / "step_100" / "replay" / "storage")
    with pytest.raises(CheckpointError, match="scratch_dir"):
        load_checkpoint(tmp_path, replay_buffer=bad)


# --------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import functools, shutil, sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[4], sys.argv[5]]
    import torch
    import dreamer_trl.checkpoint as ck
    from test_checkpoint import make_batch, make_buffer, make_state

    run_dir, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def block():
        ready.touch()  # tells the parent we are exactly at the kill point
        time.sleep(600)

    rb = make_buffer(run_dir / "scratch")
    rb.extend(make_batch(300, first_traj=0))
    ck.save_checkpoint(run_dir, make_state(100), replay_buffer=rb, keep=1)
    rb.extend(make_batch(300, first_traj=10, start_t=300))

    if point == "state":  # half of state.pt is on disk when the process dies
        real_save = torch.save
        def half_save(obj, f):
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            f.flush()
            block()
        torch.save = half_save
    elif point == "replay":  # replay dumped, nothing fsynced or renamed yet
        real_dump = ck._dump_replay
        def dump_then_block(*args):
            real_dump(*args)
            block()
        ck._dump_replay = dump_then_block
    elif point == "pointer":  # step_200 renamed into place, latest not updated
        ck._write_pointer = lambda *args: block()
    elif point == "prune":  # latest updated, old checkpoint half deleted
        real_rmtree = shutil.rmtree
        def rmtree_then_block(path, *args, **kwargs):
            if Path(path).name.startswith(".del-"):
                real_rmtree(Path(path) / "replay")
                block()
            real_rmtree(path, *args, **kwargs)
        ck.shutil.rmtree = rmtree_then_block
    ck.save_checkpoint(run_dir, make_state(200, big=True), replay_buffer=rb, keep=1)
    """
)


KILL_POINTS = {"state": 100, "replay": 100, "pointer": 100, "prune": 200}  # -> surviving step


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One child per kill point, started together (each pays ~3 s of imports), then each is
    SIGKILLed as soon as it reports that it has reached its point."""
    base = tmp_path_factory.mktemp("crash")
    script = base / "child.py"
    script.write_text(CHILD)
    children = {}
    for point in KILL_POINTS:
        run_dir, ready = base / point / "run", base / point / "ready"
        run_dir.mkdir(parents=True)
        args = [
            sys.executable,
            str(script),
            str(run_dir),
            point,
            str(ready),
            str(REPO_ROOT),
            str(Path(__file__).parent),
        ]
        children[point] = (subprocess.Popen(args, stderr=subprocess.PIPE), ready, run_dir)
    try:
        for point, (proc, ready, _) in children.items():
            _kill_when_ready(proc, ready, point)
    finally:
        for proc, _, _ in children.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    return {point: run_dir for point, (_, _, run_dir) in children.items()}


def _kill_when_ready(proc: subprocess.Popen, ready: Path, point: str) -> None:
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"child for {point!r} exited early: {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline, f"child never reached kill point {point!r}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_mid_save_leaves_a_loadable_checkpoint(
    crashed_runs: dict[str, Path], tmp_path: Path, point: str
) -> None:
    run_dir, survivor = crashed_runs[point], KILL_POINTS[point]
    root = run_dir / "checkpoints"
    names = {p.name.rsplit("-", 1)[0] for p in root.iterdir()}
    latest = (root / "latest").read_text().strip()
    debris = {  # what the kill really interrupted, so the test cannot pass vacuously
        "state": {".tmp-step_200"},
        "replay": {".tmp-step_200"},
        "pointer": {"step_200"},
        "prune": {".del-step_100"},
    }[point]
    assert debris <= names and latest == f"step_{survivor}"

    rb = make_buffer(tmp_path / "scratch_parent")
    state = load_checkpoint(find_checkpoint(run_dir), replay_buffer=rb)
    assert_state_equal(state, make_state(survivor))
    expected = make_batch(300, first_traj=0)
    if survivor == 200:
        expected = torch.cat([expected, make_batch(300, first_traj=10, start_t=300)])
        assert (state["blob"] == 200).all()
    assert len(rb) == len(expected)
    assert (rb[:].exclude("index") == expected).all()
    assert_slices_contiguous(rb.sample())

    # The next save (a new process, so the dead child's pid) cleans up the debris.
    save_checkpoint(run_dir, make_state(300), keep=1)
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert leftovers == ["latest", "step_300"]
