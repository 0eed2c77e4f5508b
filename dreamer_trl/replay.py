"""Replay of reference steps: TensorDictReplayBuffer + SliceSampler over memmap storage.

Each env is one continuous stream of steps (see :mod:`dreamer_trl.sequence`), so a
slice may cross episode boundaries (``is_first`` resets the model there) exactly like
the reference's replay, and short episodes (CartPole) never starve the sampler.
Streams of several envs interleave in storage; the sampler's ``fragmented`` mode
rebuilds them from (``stream``, ``stream_step``).

Online queue (SPEC.md, Replay; the reference's ``online`` replay): each stream's steps are
cut into consecutive, non-overlapping sequences as they arrive, and every batch takes
those fresh sequences first (at most B), filling the rest uniformly. Every step is thus
trained on at least once soon after it is collected, whatever the buffer's size.

On disk a replay costs what it holds: the memmap scratch files are sparse (only written
rows take blocks), the acting latents are stored in 16 bits (``latent_dtype``), and
:meth:`StepReplay.dumps` writes only the filled rows, not the capacity.
"""

from __future__ import annotations

import json
import tempfile
from collections import deque
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

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
        sampler = SliceSampler(
            slice_len=seq_len,
            traj_key="stream",
            step_key="stream_step",
            fragmented=True,
            strict_length=True,
        )
        # No batch size here: each sample() asks for the uniform part it needs.
        self.buffer = TensorDictReplayBuffer(storage=store, sampler=sampler)
        self.stream_steps: dict[int, int] = {}  # next step number of each env stream

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

    def sample(self) -> TensorDictBase:
        """A batch of steps [B, T+1], with ``index`` for :meth:`write_back`: the queued
        fresh sequences first, then uniform slices. The slice sampler's end markers
        (under ``"next"``) are dropped: steps carry their own is_first/is_last flags."""
        fresh = self._pop_fresh()
        rest = (self.batch_size - len(fresh)) * self.seq_len
        parts = []
        if fresh:
            index = torch.tensor([i for seq in fresh for i in seq])
            td = self.buffer.storage[index]
            td.set("index", index.unsqueeze(-1).to(td.device))  # the sampler's layout
            parts.append(td)
        if rest:
            parts.append(self.buffer.sample(batch_size=rest).exclude("next"))
        td = parts[0] if len(parts) == 1 else torch.cat(parts)
        return td.reshape(self.batch_size, self.seq_len)

    def _pop_fresh(self) -> list[list[int]]:
        """Storage indices of up to B queued sequences. One that the circular storage
        has overwritten since it was queued (a buffer smaller than the queue) is dropped:
        overwriting runs oldest first, so its first step is the one to check."""
        fresh = []
        while self.queue and len(fresh) < self.batch_size:
            stream, first, seq = self.queue.popleft()
            stored = self.buffer.storage[seq[0]]
            if stored.get("stream") == stream and stored.get("stream_step") == first:
                fresh.append(seq)
        return fresh

    def write_back(self, batch: TensorDictBase, deter: torch.Tensor, stoch: torch.Tensor) -> None:
        """Refresh the stored latents of steps 1..T with the training posteriors [B, T]."""
        index = batch.get("index")[:, 1:].reshape(-1)
        update = TensorDict(
            {
                "deter": deter.reshape(-1, deter.shape[-1]).to(self.latent_dtype),
                "stoch": stoch.reshape(-1, *stoch.shape[-2:]).to(self.latent_dtype),
            },
            [index.numel()],
        )
        self.buffer.storage.set(index, update.to(self.buffer.storage.device), set_cursor=False)

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


def _dtype(name: torch.dtype | str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    valid = ("float16", "bfloat16", "float32")
    if name not in valid:
        raise ValueError(f"replay.latent_dtype={name!r} is invalid; valid: {', '.join(valid)}")
    return getattr(torch, name)

