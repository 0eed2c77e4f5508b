"""Replay of reference steps: TensorDictReplayBuffer + SliceSampler over memmap storage.

Each env is one continuous stream of steps (see :mod:`dreamer_trl.sequence`), so a
slice may cross episode boundaries (``is_first`` resets the model there) exactly like
the reference's replay, and short episodes (CartPole) never starve the sampler.
Streams of several envs interleave in storage; the sampler's ``fragmented`` mode
rebuilds them from (``stream``, ``stream_step``).
"""

from __future__ import annotations

import tempfile

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

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
    ):
        self.batch_size, self.seq_len, self.obs_keys = batch_size, seq_len, list(obs_keys)
        self.capacity = int(capacity)
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
        self.buffer = TensorDictReplayBuffer(
            storage=store, sampler=sampler, batch_size=batch_size * seq_len
        )
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
        self.stream_steps[stream] = start + n
        self.buffer.extend(steps)
        return n

    def can_sample(self) -> bool:
        return any(n >= self.seq_len for n in self.stream_steps.values())

    def sample(self) -> TensorDictBase:
        """A batch of steps [B, T+1], with ``index`` for :meth:`write_back`."""
        td = self.buffer.sample()
        return td.reshape(self.batch_size, self.seq_len)

    def write_back(self, batch: TensorDictBase, deter: torch.Tensor, stoch: torch.Tensor) -> None:
        """Refresh the stored latents of steps 1..T with the training posteriors [B, T]."""
        index = batch.get("index")[:, 1:].reshape(-1)
        update = TensorDict(
            {
                "deter": deter.reshape(-1, deter.shape[-1]),
                "stoch": stoch.reshape(-1, *stoch.shape[-2:]),
            },
            [index.numel()],
        )
        self.buffer.storage.set(index, update.to(self.buffer.storage.device), set_cursor=False)

    def state_dict(self) -> dict:
        return {"stream_steps": dict(self.stream_steps), "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        self.stream_steps = {int(k): int(v) for k, v in state["stream_steps"].items()}
