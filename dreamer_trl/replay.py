"""Replay of reference steps: TensorDictReplayBuffer + StreamSliceSampler over memmap storage.

Each env is one continuous stream of steps (see :mod:`dreamer_trl.sequence`), so a
slice may cross episode boundaries (``is_first`` resets the model there) exactly like
the reference's replay, and short episodes (CartPole) never starve the sampler.
Streams of several envs interleave in storage; the sampler follows each by
(``stream``, ``stream_step``).

Online queue (SPEC.md, Replay; the reference's ``online`` replay): each stream's steps are
cut into consecutive, non-overlapping sequences as they arrive, and every batch takes
those fresh sequences first (at most B), filling the rest uniformly. Every step is thus
trained on at least once soon after it is collected, whatever the buffer's size.

On disk a replay costs what it holds: the memmap scratch files are sparse (only written
rows take blocks), the acting latents are stored in 16 bits (``latent_dtype``), and
:meth:`StepReplay.dumps` writes only the filled rows, not the capacity.

Replay cost does not grow with the buffer (issue 20; docs/torchrl.md, "Replay index and
write-back"). TorchRL's ``SliceSampler(fragmented=True)`` re-sorts every stored step after
each extend and rebuilds its index with a Python loop after any write it was not told of,
such as the replay-context write-back through ``storage.set``. Here
:class:`StreamSliceSampler` updates its index with the rows each extend writes, and
:class:`LatentWriter` writes the refreshed latents into the storage's columns in place,
which is no structural change: neither costs a pass over the stored steps.
"""

from __future__ import annotations

import json
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, SliceSampler, TensorDictReplayBuffer
from torchrl.data.replay_buffers import Sampler, Storage

from .checkpoint import restore_last_cursor
from .sequence import transitions_to_steps


class StepReplay:
    """Writes collector batches as steps and samples [B, T+1] sequences.

    Args:
        capacity: maximum number of stored steps (oldest overwritten first).
        batch_size: B, sequences per batch.
        seq_len: T+1, steps per sequence including the context step.
        obs_keys: observation keys to store.
        storage: ``memmap`` (disk-backed, the default) or ``tensor`` (in memory, e.g. GPU).
        scratch_dir: where the memmap files live (a temp dir if None).
        online: queue fresh sequences ahead of uniform samples (the reference's default).
        latent_dtype: dtype of the stored acting latents (deter, stoch); float16 halves
            the bytes per step (deter lies in [-1, 1], stoch is one-hot: both exact to ~5e-4).
        sampler: ``stream`` (:class:`StreamSliceSampler`, cost independent of the buffer's
            size) or ``slice`` (TorchRL's ``SliceSampler(fragmented=True)``: the same
            slices for one stream, each run of a stream equally likely for several;
            its index is re-sorted after every extend).
    """

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        seq_len: int,
        obs_keys: list[str],
        storage: str = "memmap",
        scratch_dir: str | None = None,
        device="cpu",
        online: bool = True,
        latent_dtype: torch.dtype | str = torch.float16,
        sampler: str = "stream",
    ):
        self.latent_dtype = _dtype(latent_dtype)
        self.batch_size, self.seq_len, self.obs_keys = batch_size, seq_len, list(obs_keys)
        self.online = online
        # Storage indices of each stream's steps not yet in an online sequence, and the
        # fresh sequences (seq_len storage indices each) waiting to be trained on.
        # Queue entries are (stream, first step's stream_step, storage indices).
        self._pending: dict[int, list[int]] = {}
        self.queue: deque[tuple[int, int, list[int]]] = deque()
        self.capacity = int(capacity)
        if storage == "memmap" and torch.device(device).type != "cpu":
            raise ValueError(
                f"replay.device={device} needs replay.storage=tensor: a memmap storage lives "
                "in host memory (valid with memmap: replay.device=cpu)"
            )
        if storage == "memmap":
            store = LazyMemmapStorage(
                int(capacity), scratch_dir=scratch_dir or tempfile.mkdtemp(), device=device
            )
        elif storage == "tensor":
            store = LazyTensorStorage(int(capacity), device=device)
        else:
            raise ValueError(f"replay storage {storage!r} unknown; valid: 'memmap', 'tensor'")
        sampler = _make_sampler(sampler, seq_len)
        # No batch size here: each sample() asks for the uniform part it needs.
        self.buffer = TensorDictReplayBuffer(storage=store, sampler=sampler)
        self.stream_steps: dict[int, int] = {}  # next step number of each env stream
        self.latents = LatentWriter(store, self.latent_dtype)

    def __len__(self) -> int:
        return len(self.buffer)

    def extend(self, batch: TensorDictBase, stream: int = 0) -> int:
        """Add a collector batch ([F] for one env, [N, F] for N envs). Returns steps added."""
        if batch.ndim == 2:
            return sum(self.extend(row, stream + i) for i, row in enumerate(batch.unbind(0)))
        steps = transitions_to_steps(batch, self.obs_keys)
        start = self.stream_steps.get(stream, 0)
        n = steps.shape[0]
        steps.set("stream", torch.full((n,), stream, dtype=torch.long))
        steps.set("stream_step", torch.arange(start, start + n))
        for key in LATENT_KEYS:
            steps.set(key, steps.get(key).to(self.latent_dtype))
        self.stream_steps[stream] = start + n
        self.latents.flush(wait=True)  # a deferred write must not land on overwritten rows
        index = self.buffer.extend(steps)
        if self.online:
            pending = self._pending.setdefault(stream, [])
            pending.extend(int(i) for i in index)
            while len(pending) >= self.seq_len:
                first = start + n - len(pending)  # stream_step of pending[0]
                self.queue.append((stream, first, pending[: self.seq_len]))
                del pending[: self.seq_len]
        return n

    def can_sample(self) -> bool:
        return any(n >= self.seq_len for n in self.stream_steps.values())

    def sample(self, device: torch.device | str | None = None) -> TensorDictBase:
        """A batch of steps [B, T+1], with ``index`` for :meth:`write_back`: the queued
        fresh sequences first, then uniform slices (steps carry their own is_first /
        is_last flags; TorchRL's slice end markers are not wanted).

        ``device``: where the batch goes. From a host storage to a CUDA device it is
        copied from pinned memory without blocking (the update's kernels queue behind
        the copy on the same stream); None leaves it on the storage's device."""
        self.latents.flush(wait=False)  # finished write-backs become visible first
        fresh = self._pop_fresh()
        rest = (self.batch_size - len(fresh)) * self.seq_len
        parts = []
        if fresh:
            parts.append(self._rows(torch.tensor([i for seq in fresh for i in seq])))
        if rest:
            (index,), _ = self.buffer.sampler.sample(self.buffer.storage, rest)
            parts.append(self._rows(index))
        td = parts[0] if len(parts) == 1 else torch.cat(parts)
        return to_device(td.reshape(self.batch_size, self.seq_len), device)

    def _rows(self, index: torch.Tensor) -> TensorDictBase:
        """Storage rows ``index`` [N] and, under ``index`` [N, 1], where they came from.
        ``index_select`` copies whole rows; the advanced indexing of ``storage[index]``
        gathers element by element: 6× slower for 1040 size1m rows here, 5× for pixels."""
        columns = self.buffer.storage._storage
        index = index if columns.device is None else index.to(columns.device)
        td = columns.apply(lambda x: x.index_select(0, index), batch_size=[index.numel()])
        td.set("index", index.unsqueeze(-1))  # the slice sampler's layout
        return td

    def _pop_fresh(self) -> list[list[int]]:
        """Storage indices of up to B queued sequences. One that the circular storage
        has overwritten since it was queued (a buffer smaller than the queue) is dropped:
        overwriting runs oldest first, so its first step is the one to check. The check
        reads two columns for all candidates at once: one host read per batch, not one
        per sequence (a sync each when the storage is on a GPU)."""
        fresh: list[list[int]] = []
        rows = self.buffer.storage._storage if self.queue else None
        while self.queue and len(fresh) < self.batch_size:
            take = min(self.batch_size - len(fresh), len(self.queue))
            cands = [self.queue.popleft() for _ in range(take)]
            firsts = torch.tensor([seq[0] for _, _, seq in cands])
            firsts = firsts.to(rows.get("stream").device)
            stored = zip(
                rows.get("stream")[firsts].tolist(), rows.get("stream_step")[firsts].tolist()
            )
            fresh += [seq for (s, f, seq), got in zip(cands, stored) if got == (s, f)]
        return fresh

    def write_back(self, batch: TensorDictBase, deter: torch.Tensor, stoch: torch.Tensor) -> None:
        """Refresh the stored latents of steps 1..T with the training posteriors [B, T].

        Never a structural write: the sampler's index survives (module docstring), and
        from a CUDA learner into a host storage the host does not wait for the GPU."""
        index = batch.get("index")[:, 1:].reshape(-1)
        self.latents.put(
            index,
            {
                "deter": deter.reshape(-1, deter.shape[-1]),
                "stoch": stoch.reshape(-1, *stoch.shape[-2:]),
            },
        )

    # ---- on disk -------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the stored steps (what :meth:`dumps` writes, give or take metadata)."""
        n = len(self.buffer)
        return n * self.bytes_per_step() if n else 0

    def bytes_per_step(self) -> int:
        if len(self.buffer) == 0:
            return 0
        row = self.buffer.storage._storage[0]
        return sum(v.numel() * v.element_size() for v in row.values(True, True))

    def dumps(self, path: str | Path) -> None:
        """Write the filled rows and the writer's position to ``path`` (a new dir)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.latents.flush(wait=True)  # the dump holds every write-back made so far
        n = len(self.buffer)
        if n:
            rows = self.buffer.storage._storage[:n]
            rows.memmap(path / STEPS_DIR, copy_existing=True, num_threads=0)
        writer = self.buffer._writer.state_dict()
        info = {
            "format": DUMP_FORMAT,
            "rows": n,
            "capacity": self.capacity,
            "cursor": int(writer["_cursor"]),
            "write_count": int(writer.get("_write_count") or 0),
        }
        (path / DUMP_INFO).write_text(json.dumps(info, indent=2))

    def loads(self, path: str | Path) -> None:
        """Restore what :meth:`dumps` wrote into this (empty) replay, or a TorchRL
        ``ReplayBuffer.dumps`` dir written by older versions (dense at capacity)."""
        path = Path(path)
        self.latents.pending.clear()  # rows they were meant for are replaced
        if not (path / DUMP_INFO).is_file():
            self.buffer.loads(path)
            restore_last_cursor(self.buffer)
            return
        info = json.loads((path / DUMP_INFO).read_text())
        if info.get("format") != DUMP_FORMAT:
            raise ValueError(f"replay dump {path} has format {info.get('format')!r}, "
                             f"this version reads {DUMP_FORMAT}")
        if info["capacity"] != self.capacity:
            raise ValueError(f"replay dump {path} was saved at capacity {info['capacity']}, "
                             f"this replay has {self.capacity}")
        n = int(info["rows"])
        if n:
            rows = TensorDict.load_memmap(path / STEPS_DIR)
            if rows.shape[0] != n:
                raise ValueError(f"replay dump {path} holds {rows.shape[0]} rows, "
                                 f"its {DUMP_INFO} says {n}")
            self.buffer.storage.set(torch.arange(n), rows)
        self.buffer._writer.load_state_dict(
            {"_cursor": info["cursor"], "_write_count": info["write_count"]}
        )
        if n:
            restore_last_cursor(self.buffer, force=True)

    def state_dict(self) -> dict:
        return {
            "stream_steps": dict(self.stream_steps),
            "capacity": self.capacity,
            "online_pending": {k: list(v) for k, v in self._pending.items()},
            "online_queue": [[stream, first, list(seq)] for stream, first, seq in self.queue],
        }

    def load_state_dict(self, state: dict) -> None:
        self.stream_steps = {int(k): int(v) for k, v in state["stream_steps"].items()}
        # Checkpoints from before the online queue have neither key: it starts empty.
        self._pending = {int(k): list(v) for k, v in state.get("online_pending", {}).items()}
        self.queue = deque(
            (int(stream), int(first), list(seq))
            for stream, first, seq in state.get("online_queue", [])
        )


LATENT_KEYS = ("deter", "stoch")
STEPS_DIR = "steps"  # the filled rows, a TensorDict memmap
DUMP_INFO = "replay.json"
DUMP_FORMAT = 2  # 1 (unnamed): TorchRL's ReplayBuffer.dumps, the whole capacity


def _make_sampler(name: str, seq_len: int) -> Sampler:
    if name == "stream":
        return StreamSliceSampler(seq_len, traj_key="stream", step_key="stream_step")
    if name == "slice":
        return SliceSampler(
            slice_len=seq_len,
            traj_key="stream",
            step_key="stream_step",
            fragmented=True,
            strict_length=True,
        )
    raise ValueError(f"replay sampler {name!r} unknown; valid: 'stream', 'slice'")


def _dtype(name: torch.dtype | str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    valid = ("float16", "bfloat16", "float32")
    if name not in valid:
        raise ValueError(f"replay.latent_dtype={name!r} is invalid; valid: {', '.join(valid)}")
    return getattr(torch, name)



def to_device(td: TensorDictBase, device: torch.device | str | None) -> TensorDictBase:
    """``td`` on ``device``. Host → CUDA goes through pinned memory with a non-blocking
    copy: a pageable copy would make the host wait for the transfer, and the kernels that
    read the batch are queued on the same stream, so nothing reads it early."""
    if device is None or torch.device(device) == td.device:
        return td
    if pinned_copy(td.device, device):
        return td.pin_memory().to(device, non_blocking=True)
    return td.to(device)


def pinned_copy(src: torch.device | str | None, dst: torch.device | str) -> bool:
    """Whether a copy ``src`` → ``dst`` should be staged in pinned host memory."""
    src = torch.device(src or "cpu")
    return src.type == "cpu" and torch.device(dst).type == "cuda" and torch.cuda.is_available()


class _Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class PendingWrite:
    """Latents copied off the GPU without blocking; scattered once ``event`` completes."""

    index: torch.Tensor  # storage rows [N], on the host
    values: dict[str, torch.Tensor]  # column → [N, ...] in the storage dtype, host
    event: _Event


class LatentWriter:
    """Writes replay-context latents straight into a storage's columns.

    ``storage.set`` would bump TorchRL's mutation revision, and the fragmented
    SliceSampler answers an unexplained revision by rebuilding its index of every stored
    step with a Python loop (0.5 s per update at 1M steps, docs/results.md). Latents are
    not part of that index (stream, stream_step), so writing the column tensors in place
    is exact and leaves the index valid. (Telling the sampler through ``mark_update``
    would be correct too, but it re-sorts all stored steps on every update.)

    From a CUDA learner into a host storage the latents are copied non-blocking into
    pinned memory and scattered once their CUDA event has completed: checked before each
    sample (a sample may miss the latest update's latents, as with any prefetching
    replay), waited for before rows are overwritten or saved, and after ``max_pending``.
    """

    def __init__(self, storage: Any, dtype: torch.dtype, max_pending: int = 4):
        self.storage, self.dtype, self.max_pending = storage, dtype, max_pending
        self.pending: deque[PendingWrite] = deque()

    def put(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write ``values`` (column → [N, ...]) at storage rows ``index`` [N]."""
        values = {k: v.detach().to(self.dtype) for k, v in values.items()}
        dst = self._columns().get(next(iter(values))).device
        if index.device.type == "cuda" and dst.type == "cpu":
            self.pending.append(_copy_to_host(index, values))
            while len(self.pending) > self.max_pending:
                self._apply(self.pending.popleft())
            return
        index = index.to(dst, non_blocking=True)
        self._scatter(index, {k: v.to(dst, non_blocking=True) for k, v in values.items()})

    def flush(self, wait: bool) -> None:
        """Scatter the pending writes whose copies are done (all of them with ``wait``),
        oldest first, so a row written twice keeps the newer latents."""
        while self.pending and (wait or self.pending[0].event.query()):
            self._apply(self.pending.popleft())

    def _apply(self, write: PendingWrite) -> None:
        write.event.synchronize()
        self._scatter(write.index, write.values)

    def _scatter(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        # index_copy_ copies whole rows: 1.3-1.7x faster than ``column[index] = value``
        # here. A row sampled twice in one batch keeps one of its two latents, as before.
        columns = self._columns()
        for key, value in values.items():
            columns.get(key).index_copy_(0, index, value)

    def _columns(self) -> TensorDictBase:
        return self.storage._storage  # the stored TensorDict: one tensor per key


def _copy_to_host(index: torch.Tensor, values: dict[str, torch.Tensor]) -> PendingWrite:
    def pinned(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    host = {k: pinned(v) for k, v in values.items()}
    write = PendingWrite(pinned(index), host, torch.cuda.Event())
    write.event.record(torch.cuda.current_stream(index.device))  # after the copies
    return write


class StreamSliceSampler(Sampler):
    """Uniform slices of ``slice_len`` consecutive steps of one env stream, with an index
    that each write updates in time proportional to the rows written.

    Each stream's steps are written in order and a circular storage overwrites its oldest
    rows first, so the live steps of a stream are one run of consecutive ``step_key``
    values. Per stream the sampler keeps the storage slot of every live step (a
    :class:`_Run`); a write appends the new rows and drops the overwritten ones. A slice
    is a window drawn uniformly over all windows of all streams (the reference's uniform
    replay), by one ``randint`` and a gather: no pass over the stored steps. (A stream
    with gaps — e.g. one extend larger than the storage, whose wrapped rows TorchRL writes
    twice in one indexing call — becomes several runs, the newest one extended.)

    TorchRL's ``SliceSampler(fragmented=True)`` draws the same slices for one stream, but
    re-sorts every stored step after each write (0.23 s at 1M steps, docs/torchrl.md) and
    rebuilds with a Python loop after any write it is not told of. Writes that bypass the
    writer (``storage.set``, e.g. a restore) are detected by the storage's mutation
    revision and answered with one rebuild; :class:`LatentWriter` does not move it.
    """

    def __init__(self, slice_len: int, traj_key: str = "stream", step_key: str = "stream_step"):
        self.slice_len, self.traj_key, self.step_key = int(slice_len), traj_key, step_key
        self._clear()

    def _clear(self) -> None:
        # Each stream's runs, oldest first; only the last one grows. None: rebuild first.
        self._runs: dict[int, list[_Run]] | None = None
        self._slot_stream = torch.empty(0, dtype=torch.long)  # -1: no live row
        self._slot_step = torch.empty(0, dtype=torch.long)
        self._revision: int | None = None

    # ---- TorchRL's sampler interface -------------------------------------------------
    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        """Storage indices ([batch_size],): batch_size // slice_len slices, back to back."""
        if batch_size % self.slice_len:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the slice "
                             f"length {self.slice_len}")
        streams = [run for runs in self._ready(storage).values() for run in runs]
        windows = torch.tensor([run.windows(self.slice_len) for run in streams], dtype=torch.long)
        total = int(windows.sum())
        if total == 0:
            raise RuntimeError(f"no stream holds {self.slice_len} consecutive steps yet")
        n = batch_size // self.slice_len
        draw = torch.randint(total, (n,), generator=self._rng)
        ends = windows.cumsum(0)
        which = torch.searchsorted(ends, draw, right=True)
        offset = draw - (ends - windows)[which]
        index = torch.empty(n, self.slice_len, dtype=torch.long)
        for j in which.unique().tolist():
            picked = which == j
            index[picked] = streams[j].slots(offset[picked], self.slice_len)
        index = index.reshape(-1)
        device = storage._storage.device  # the index is kept on the host
        if device is not None and pinned_copy("cpu", device):  # no wait for the GPU's queue
            index = index.pin_memory().to(device, non_blocking=True)
        return (index,), {}  # SliceSampler's layout: one index per storage dim

    def mark_update(self, index: int | torch.Tensor, *, storage: Storage | None = None) -> None:
        """The writer wrote rows ``index`` (it calls this after every extend/add)."""
        revision = _revision(storage)
        if storage is None or self._runs is None or revision != _next(self._revision):
            self._runs = None  # something else changed the storage too: rebuild on use
            return
        self._revision = revision
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        stream, step = (_column(storage, key, index) for key in (self.traj_key, self.step_key))
        self._forget(index)
        self._slot_stream[index], self._slot_step[index] = stream, step
        if not self._append(index, stream, step):
            self._rebuild()

    def _sampleable_count(self, storage: Storage, batch_size: int) -> int:
        runs = self._ready(storage).values()
        return sum(run.windows(self.slice_len) for stream in runs for run in stream)

    def _empty(self) -> None:
        self._clear()

    def state_dict(self) -> dict:
        return {}  # everything is derived from the stored rows

    def load_state_dict(self, state_dict: dict) -> None:
        self._runs = None

    def dumps(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def loads(self, path) -> None:
        self._runs = None

    # ---- the index -------------------------------------------------------------------
    def _ready(self, storage: Storage) -> dict[int, list[_Run]]:
        if self._runs is None or _revision(storage) != self._revision:
            self._rebuild(storage)
        return self._runs

    def _rebuild(self, storage: Storage | None = None) -> None:
        """Runs from the per-slot columns, read again from ``storage`` when given. Sorts
        every stored step: only to start, after writes the sampler was not told of, and
        when new rows do not continue their stream (a gap)."""
        if storage is not None:
            self._read_slots(storage)
        self._runs = _runs_from_slots(self._slot_stream, self._slot_step)

    def _read_slots(self, storage: Storage) -> None:
        n = len(storage)
        size = max(n, int(getattr(storage, "max_size", n)))
        self._slot_stream = torch.full((size,), -1, dtype=torch.long)
        self._slot_step = torch.full((size,), -1, dtype=torch.long)
        if n:
            rows = torch.arange(n)
            self._slot_stream[:n] = _column(storage, self.traj_key, rows)
            self._slot_step[:n] = _column(storage, self.step_key, rows)
        self._revision = _revision(storage)

    def _forget(self, index: torch.Tensor) -> None:
        """Drop the steps that rows ``index`` held: each stream's run starts after the
        newest step of it that was overwritten (the oldest go first; a row overwritten
        mid-run cuts the run there, so no slice ever reads a replaced row)."""
        if int(index.max()) >= self._slot_stream.numel():
            grow = max(int(index.max()) + 1, 2 * self._slot_stream.numel())
            self._slot_stream = _grown(self._slot_stream, grow)
            self._slot_step = _grown(self._slot_step, grow)
        old_stream, old_step = self._slot_stream[index], self._slot_step[index]
        live = old_stream >= 0
        for s in old_stream[live].unique().tolist():
            newest = int(old_step[live & (old_stream == s)].max()) + 1
            runs = self._runs.get(s, [])
            for run in runs:
                run.drop_until(newest)
            runs[:-1] = [run for run in runs[:-1] if run.hi > run.lo]

    def _append(self, index: torch.Tensor, stream: torch.Tensor, step: torch.Tensor) -> bool:
        """Extend each stream's run with its new rows; False if they do not continue it."""
        for s in stream.unique().tolist():
            mine = stream == s
            steps, slots = step[mine], index[mine]
            if steps.numel() > 1 and not bool((steps.diff() == 1).all()):
                return False
            runs = self._runs.setdefault(s, [_Run()])
            if not runs[-1].append(int(steps[0]), slots):
                return False
        return True


class _Run:
    """One stream's live steps lo..hi-1: ``buf[k - base]`` is the storage slot of step k."""

    def __init__(self, lo: int = 0, slots: torch.Tensor | None = None):
        self.buf = slots.clone() if slots is not None else torch.empty(0, dtype=torch.long)
        self.base = self.lo = lo
        self.hi = lo + self.buf.numel()

    def windows(self, length: int) -> int:
        return max(0, self.hi - self.lo - length + 1)

    def slots(self, offset: torch.Tensor, length: int) -> torch.Tensor:
        """Slots [k, length] of the windows that start ``offset`` steps after lo."""
        start = offset + (self.lo - self.base)
        return self.buf[start.unsqueeze(-1) + torch.arange(length)]

    def drop_until(self, step: int) -> None:
        self.lo = min(max(self.lo, step), self.hi)

    def append(self, first: int, slots: torch.Tensor) -> bool:
        if self.hi == self.lo:  # empty: the run restarts wherever its stream is
            self.buf, self.base, self.lo, self.hi = slots.clone(), first, first, first
            self.hi += slots.numel()
            return True
        if first != self.hi:
            return False
        need = self.hi - self.base + slots.numel()
        if need > self.buf.numel():  # compact to the live part, with room to grow
            live = self.buf[self.lo - self.base : self.hi - self.base]
            buf = torch.empty(max(2 * (live.numel() + slots.numel()), 1024), dtype=torch.long)
            buf[: live.numel()] = live
            self.buf, self.base = buf, self.lo
        start = self.hi - self.base
        self.buf[start : start + slots.numel()] = slots
        self.hi += slots.numel()
        return True


def _runs_from_slots(slot_stream: torch.Tensor, slot_step: torch.Tensor) -> dict[int, list[_Run]]:
    """Each stream's runs of consecutive steps, oldest first, from the per-slot columns."""
    runs = {}
    for s in slot_stream[slot_stream >= 0].unique().tolist():
        slots = (slot_stream == s).nonzero().squeeze(-1)
        steps, order = slot_step[slots].sort()
        cuts = [0, *((steps.diff() != 1).nonzero().squeeze(-1) + 1).tolist(), steps.numel()]
        runs[s] = [
            _Run(int(steps[a]), slots[order[a:b]]) for a, b in zip(cuts[:-1], cuts[1:])
        ]
    return runs


def _column(storage: Storage, key: str, index: torch.Tensor) -> torch.Tensor:
    """One integer column at rows ``index``, on the host (reads only that column)."""
    column = storage._storage.get(key)
    return column[index.to(column.device)].reshape(-1).to("cpu", torch.long)


def _grown(t: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.full((size,), -1, dtype=t.dtype)
    out[: t.numel()] = t
    return out


def _revision(storage: Storage | None) -> int | None:
    """TorchRL's count of the storage's writes (private; None where a storage lacks it)."""
    value = getattr(storage, "_mutation_revision", None)
    return None if value is None else int(value)


def _next(revision: int | None) -> int | None:
    return None if revision is None else revision + 1
