"""Crash-safe training checkpoints.

Layout of a run directory::

    run_dir/checkpoints/
        step_<N>/            one complete checkpoint (N = counters["env_steps"])
            state.pt         torch.save of the training state dict
            meta.json        small human-readable summary
            replay/          ReplayBuffer.dumps() output (optional)
        latest               text file holding the name of the newest complete checkpoint
        .tmp-step_<N>-<pid>  a save in progress (or left behind by a crash)

Atomicity: a checkpoint is written entirely inside a temp directory, every file is fsynced,
and only then is the directory renamed into place (``os.replace`` is atomic on POSIX). The
``latest`` pointer is replaced the same way, after the rename. So at any instant a
``step_<N>`` directory is complete and ``latest`` names a complete one; a process killed
mid-save leaves only a ``.tmp-*`` directory, which the next save removes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "capture_rng",
    "find_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
REPLAY_DIR = "replay"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Names of in-progress files/dirs; the trailing number is the writer's pid.
_TMP_RE = re.compile(r"^\.(?:tmp-step_\d+|old-step_\d+|del-step_\d+|latest\.tmp)-(\d+)$")
_EXPECTED = (
    "expected a checkpoint directory containing state.pt, a run directory with "
    "checkpoints/latest (or checkpoints/step_<N>/), or a path to a state.pt file"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or incompatible with the current run."""


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Snapshot the global RNG states (python, numpy, torch CPU and CUDA if present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng`; absent entries are left alone."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    # A checkpoint from a GPU machine may be resumed on a CPU-only one: skip CUDA then.
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in cuda_states])


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | Path,
    state: dict[str, Any],
    *,
    replay_buffer: Any | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_<N>/`` and point ``latest`` at it.

    Args:
        run_dir: the run's output directory.
        state: picklable dict; must hold ``state["counters"]["env_steps"]``. Conventionally
            also model/optimizer state_dicts, ``rng`` (:func:`capture_rng`) and ``meta``.
        replay_buffer: a TorchRL replay buffer saved with ``dumps`` into ``replay/``.
        keep: number of complete checkpoints to keep (the new one included).

    Returns:
        The path of the new checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    step = _env_steps(state)
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(ckpt_root)

    name = f"step_{step}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_state(tmp / STATE_FILE, state)
        replay_status = _dump_replay(replay_buffer, tmp / REPLAY_DIR)
        _write_json(tmp / META_FILE, _meta_summary(step, state, replay_status))
        _fsync_tree(tmp)
        final = _publish(tmp, ckpt_root / name)
    except BaseException:
        # Best effort: a leftover .tmp dir is harmless (cleaned by the next save).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(ckpt_root, name)
    _prune(ckpt_root, keep=keep, current=name)
    return final


def _env_steps(state: dict[str, Any]) -> int:
    try:
        return int(state["counters"]["env_steps"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            "save_checkpoint needs state['counters']['env_steps'] (an int) to name the "
            f"checkpoint: {exc!r}"
        ) from exc


def _write_state(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _dump_replay(replay_buffer: Any | None, path: Path) -> str:
    """Dump the buffer; returns 'saved', 'empty' or 'none' for meta.json."""
    if replay_buffer is None:
        return "none"
    # TorchRL refuses to dump a storage that never received data ("non-initialized").
    if len(replay_buffer) == 0:
        return "empty"
    replay_buffer.dumps(path)
    return "saved"


def _meta_summary(step: int, state: dict[str, Any], replay_status: str) -> dict[str, Any]:
    return {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix_time": time.time(),
        "counters": state.get("counters", {}),
        "replay": replay_status,
        "meta": state.get("meta", {}),
    }


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` so the rename publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is replaced."""
    if final.exists():
        # rename(2) cannot replace a non-empty directory: move the old one aside first.
        # If we die in between, find_checkpoint falls back to the newest complete step_*.
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _write_pointer(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / LATEST_FILE)
    _fsync_dir(ckpt_root)


def _complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete checkpoint, oldest step first."""
    found = []
    for child in ckpt_root.iterdir() if ckpt_root.is_dir() else ():
        match = _STEP_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _prune(ckpt_root: Path, *, keep: int, current: str) -> None:
    """Delete all but the ``keep`` newest checkpoints; never the one just written."""
    others = [p for _, p in _complete_checkpoints(ckpt_root) if p.name != current]
    for path in others[: max(len(others) - (keep - 1), 0)]:
        # Rename first so a kill mid-delete never leaves a half-deleted "complete" step_*.
        trash = ckpt_root / f".del-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp_dirs(ckpt_root: Path) -> None:
    """Remove temp files/dirs left by saves whose process no longer exists (a crash)."""
    for child in ckpt_root.iterdir():
        match = _TMP_RE.match(child.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        original = ckpt_root / child.name[len(".old-") :].rsplit("-", 1)[0]
        if child.name.startswith(".old-") and not original.exists():
            # Killed between the two renames in _publish: this is the only copy; restore it.
            os.replace(child, original)
        elif child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are stale by definition: we are not saving now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- loading


def find_checkpoint(path_or_run: str | Path) -> Path:
    """Resolve a checkpoint directory from a checkpoint dir, a run dir or a state.pt path.

    For a run directory, ``checkpoints/latest`` is used; if it is missing or names an
    incomplete directory, the newest complete ``step_<N>`` is used instead.

    Raises:
        CheckpointError: nothing loadable was found.
    """
    path = Path(path_or_run).expanduser()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist ({_EXPECTED})")
    if path.is_file():
        if path.name == STATE_FILE:
            return path.parent
        raise CheckpointError(
            f"no checkpoint at {path}: it is a file but not {STATE_FILE} ({_EXPECTED})"
        )
    if (path / STATE_FILE).is_file():
        return path
    ckpt_root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    found = _from_latest(ckpt_root) or _newest_complete(ckpt_root)
    if found is None:
        raise CheckpointError(f"no checkpoint found in {path} ({_EXPECTED})")
    return found


def _from_latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST_FILE
    if not pointer.is_file():
        return None
    target = ckpt_root / pointer.read_text().strip()
    if (target / STATE_FILE).is_file():
        return target
    log.warning(
        "%s names %s, which is not a complete checkpoint; using the newest complete one instead",
        pointer,
        target,
    )
    return None


def _newest_complete(ckpt_root: Path) -> Path | None:
    found = _complete_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def load_checkpoint(
    path: str | Path,
    *,
    expected_meta: dict[str, Any] | None = None,
    replay_buffer: Any | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint`.

    Args:
        path: anything :func:`find_checkpoint` accepts.
        expected_meta: values this run requires in ``state["meta"]`` (e.g. model name,
            obs keys, action dim); any difference raises :class:`CheckpointError`.
        replay_buffer: if given, restored in place with ``replay_buffer.loads``.
        map_location: forwarded to ``torch.load``.

    Returns:
        The saved state dict.
    """
    ckpt = find_checkpoint(path)
    state = _read_state(ckpt / STATE_FILE, map_location)
    if expected_meta:
        _check_meta(ckpt, state.get("meta", {}), expected_meta)
    if replay_buffer is not None:
        _load_replay(ckpt, replay_buffer)
    return state


def _read_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        # weights_only=False: these are our own files and hold numpy/python RNG states.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} refers to code that is not importable here: {exc}"
        ) from exc
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
    ) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _normalise(value: Any) -> Any:
    """Make tuples/lists and OmegaConf containers compare equal to their plain forms."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


def _check_meta(ckpt: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    problems = []
    for key, want in expected.items():
        if key not in stored:
            problems.append(
                f"checkpoint has no {key!s} recorded, this run asks for {key}={_normalise(want)}"
            )
            continue
        have = stored[key]
        if _normalise(have) != _normalise(want):
            problems.append(
                f"checkpoint was trained with {key}={_normalise(have)}, "
                f"this run asks for {key}={_normalise(want)}"
            )
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} does not match this run: " + "; ".join(problems))


def _load_replay(ckpt: Path, replay_buffer: Any) -> None:
    replay_dir = ckpt / REPLAY_DIR
    if not replay_dir.is_dir():
        if _replay_status(ckpt) == "empty":
            return  # the buffer was empty when saved: leaving it empty is the faithful restore
        raise CheckpointError(f"checkpoint {ckpt} has no replay buffer ({replay_dir} missing)")
    _refuse_scratch_inside(ckpt, replay_buffer)
    try:
        replay_buffer.loads(replay_dir)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"could not restore the replay buffer from {replay_dir}: {exc} (a LazyMemmapStorage "
            "whose scratch_dir already holds files needs existsok=True or a fresh scratch_dir)"
        ) from exc
    _restore_last_cursor(replay_buffer)


def _restore_last_cursor(replay_buffer: Any) -> None:
    """Re-derive the storage's last-write position, which TorchRL 0.14 ``loads`` drops.

    SliceSampler treats that position as a trajectory boundary once the buffer has wrapped;
    without it, done-based slices can join the newest unfinished episode to the oldest data
    that follows it in memory (and the next ``dumps`` warns "last_cursor is None"). For a
    round-robin writer the last write is just before the writer's restored cursor.
    """
    storage = getattr(replay_buffer, "_storage", None)
    cursor = getattr(getattr(replay_buffer, "_writer", None), "_cursor", None)
    if (
        storage is None
        or not isinstance(cursor, int)
        or getattr(storage, "_last_cursor", 0) is not None  # already known
        or getattr(storage, "ndim", 1) != 1
        or not hasattr(storage, "_set_last_cursor")
        or len(storage) == 0
    ):
        return
    storage._set_last_cursor((cursor - 1) % storage.max_size)


def _replay_status(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / META_FILE).read_text()).get("replay")
    except (OSError, ValueError):
        return None


def _refuse_scratch_inside(ckpt: Path, replay_buffer: Any) -> None:
    """TorchRL maps a LazyMemmapStorage straight onto files that sit in its scratch_dir.

    If that scratch_dir were the checkpoint itself, training would silently rewrite the
    checkpoint and pruning would delete the live buffer's backing files.
    """
    scratch = getattr(getattr(replay_buffer, "_storage", None), "scratch_dir", None)
    if scratch is None:
        return
    root = ckpt.parent.resolve()
    scratch_path = Path(scratch).resolve()
    if scratch_path == root or root in scratch_path.parents:
        raise CheckpointError(
            f"the replay buffer's scratch_dir {scratch_path} lies inside the checkpoint "
            f"directory {root}; give the storage its own scratch_dir"
        )
