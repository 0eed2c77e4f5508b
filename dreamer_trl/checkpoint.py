"""Crash-safe training checkpoints.

Layout of a run directory::

    run_dir/checkpoints/
        step_<N>/            one complete checkpoint (N = counters["env_steps"])
            state.pt         torch.save of the training state dict
            meta.json        small human-readable summary
            replay/          the replay's dumps() output (optional)
            manifest.json    size and crc32 of every other file, checked on load
        latest               text file holding the name of the newest complete checkpoint
        .tmp-step_<N>-<pid>  a save in progress (or left behind by a crash)

Atomicity: a checkpoint is written entirely inside a temp directory, every file is fsynced,
and only then is the directory renamed into place (``os.replace`` is atomic on POSIX). The
``latest`` pointer is replaced the same way, after the rename. So at any instant a
``step_<N>`` directory is complete and ``latest`` names a complete one; a process killed
mid-save leaves only a ``.tmp-*`` directory, which the next save removes.

Integrity: a load verifies every file against the manifest and refuses a damaged checkpoint
naming the file (:func:`verified_checkpoint` can fall back to an older one). A save first
checks the free disk space against its expected size and refuses with one line
(:class:`DiskFullError`) instead of filling the disk; the previous checkpoint stays latest.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "capture_rng",
    "expected_bytes",
    "find_checkpoint",
    "load_checkpoint",
    "load_replay",
    "restore_rng",
    "save_checkpoint",
    "verified_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
REPLAY_DIR = "replay"
MANIFEST_FILE = "manifest.json"
_MARGIN = 16 << 20  # bytes kept free beyond a checkpoint's expected size (pickle overhead, fs)
_STEP_RE = re.compile(r"^step_(\d+)$")
# Names of in-progress files/dirs; the trailing number is the writer's pid.
_TMP_RE = re.compile(r"^\.(?:tmp-step_\d+|old-step_\d+|del-step_\d+|latest\.tmp)-(\d+)$")
_EXPECTED = (
    "expected a checkpoint directory containing state.pt, a run directory with "
    "checkpoints/latest (or checkpoints/step_<N>/), or a path to a state.pt file"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or incompatible with the current run."""


class DiskFullError(CheckpointError):
    """Not enough free disk space to write a checkpoint (nothing was published)."""


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
    step: int | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_<N>/`` and point ``latest`` at it.

    Args:
        run_dir: the run's output directory.
        state: picklable dict; must hold ``state["counters"]["env_steps"]``. Conventionally
            also model/optimizer state_dicts, ``rng`` (:func:`capture_rng`) and ``meta``.
        replay_buffer: anything with ``dumps(dir)`` and ``len()`` (a StepReplay, or a TorchRL
            replay buffer), saved into ``replay/``; ``nbytes()``, when it has one, sizes
            the free-space check.
        keep: number of complete checkpoints to keep (the new one included).
        step: N in the name (default: the env steps; an offline run, whose env steps stay
            0, counts its updates).

    Returns:
        The path of the new checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    step = _env_steps(state) if step is None else int(step)
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(ckpt_root)

    name = f"step_{step}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = expected_bytes(state, replay_buffer)
    _check_free_space(ckpt_root, name, needed)
    tmp.mkdir()
    try:
        _write_state(tmp / STATE_FILE, state)
        replay_status = _dump_replay(replay_buffer, tmp / REPLAY_DIR)
        _write_json(tmp / META_FILE, _meta_summary(step, state, replay_status))
        _write_manifest(tmp)
        _fsync_tree(tmp)
        final = _publish(tmp, ckpt_root / name)
    except BaseException as exc:
        # Best effort: a leftover .tmp dir is harmless (cleaned by the next save).
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(ckpt_root).free
            raise DiskFullError(_disk_full_message(ckpt_root, name, needed, free)) from None
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


def expected_bytes(state: dict[str, Any], replay_buffer: Any | None = None) -> int:
    """About what :func:`save_checkpoint` writes: the state's tensors and the replay."""
    total, stack = 0, [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    nbytes = getattr(replay_buffer, "nbytes", None)
    return total + (int(nbytes()) if callable(nbytes) else 0)


def _check_free_space(ckpt_root: Path, name: str, needed: int) -> None:
    free = shutil.disk_usage(ckpt_root).free
    if free < needed + _MARGIN:
        raise DiskFullError(_disk_full_message(ckpt_root, name, needed + _MARGIN, free))


def _disk_full_message(ckpt_root: Path, name: str, needed: int, free: int) -> str:
    latest = _newest_complete(ckpt_root)
    kept = f"{latest.name} stays the latest" if latest else "no checkpoint was written yet"
    return (
        f"disk full: checkpoint {name} needs about {_mb(needed)} in {ckpt_root}, "
        f"only {_mb(free)} free; {kept}"
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _write_manifest(root: Path) -> None:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[str(path.relative_to(root))] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    _write_json(root / MANIFEST_FILE, {"files": files})


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


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


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file of ``ckpt`` against its manifest; CheckpointError names the first
    missing, resized or changed file. Checkpoints older than manifests pass with a warning."""
    manifest = ckpt / MANIFEST_FILE
    if not manifest.is_file():
        log.warning("checkpoint %s has no %s (written by an older version): not verified",
                    ckpt, MANIFEST_FILE)
        return
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {MANIFEST_FILE} unreadable "
                              f"({exc})") from None
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {rel} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged: {rel} has {size} bytes, "
                f"the manifest records {want['bytes']}"
            )
        if _crc32(path) != want["crc32"]:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged: {rel} fails its checksum "
                f"(crc32 {_crc32(path)}, the manifest records {want['crc32']})"
            )


def verified_checkpoint(path_or_run: str | Path, fallback: bool = False) -> Path:
    """:func:`find_checkpoint`, verified. With ``fallback``, a damaged checkpoint is skipped
    (with a warning) for the next older complete one in the same directory."""
    ckpt = find_checkpoint(path_or_run)
    try:
        verify_checkpoint(ckpt)
        return ckpt
    except CheckpointError as first:
        if not fallback:
            raise
        older = [p for step, p in _complete_checkpoints(ckpt.parent) if p != ckpt]
        for cand in reversed(older):
            try:
                verify_checkpoint(cand)
            except CheckpointError as exc:
                log.warning("skipping %s", exc)
                continue
            log.warning("%s; falling back to %s", first, cand.name)
            return cand
        raise


def load_checkpoint(
    path: str | Path,
    *,
    expected_meta: dict[str, Any] | None = None,
    replay_buffer: Any | None = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint`.

    Args:
        path: anything :func:`find_checkpoint` accepts.
        expected_meta: values this run requires in ``state["meta"]`` (e.g. model name,
            obs keys, action dim); any difference raises :class:`CheckpointError`.
        replay_buffer: if given, restored in place with ``replay_buffer.loads``.
        map_location: forwarded to ``torch.load``.
        verify: check the files against the manifest first (:func:`verify_checkpoint`).

    Returns:
        The saved state dict.
    """
    ckpt = find_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    state = _read_state(ckpt / STATE_FILE, map_location)
    if expected_meta:
        _check_meta(ckpt, state.get("meta", {}), expected_meta)
    if replay_buffer is not None:
        load_replay(ckpt, replay_buffer)
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


def load_replay(ckpt: Path, replay_buffer: Any) -> None:
    """Restore ``ckpt``'s replay into ``replay_buffer`` (anything with ``loads(dir)``)."""
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
    restore_last_cursor(replay_buffer)


def restore_last_cursor(replay_buffer: Any, force: bool = False) -> None:
    """Re-derive the storage's last-write position, which TorchRL 0.14 ``loads`` drops
    (and which a row-by-row restore never sets; ``force`` replaces what that left).

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
        or (getattr(storage, "_last_cursor", 0) is not None and not force)  # already known
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
    buffer = getattr(replay_buffer, "buffer", replay_buffer)  # a StepReplay wraps one
    scratch = getattr(getattr(buffer, "_storage", None), "scratch_dir", None)
    if scratch is None:
        return
    root = ckpt.parent.resolve()
    scratch_path = Path(scratch).resolve()
    if scratch_path == root or root in scratch_path.parents:
        raise CheckpointError(
            f"the replay buffer's scratch_dir {scratch_path} lies inside the checkpoint "
            f"directory {root}; give the storage its own scratch_dir"
        )
