"""StepReplay's online queue (SPEC.md, Replay): each stream's fresh steps form consecutive,
non-overlapping sequences that batches take first; the rest of a batch is uniform."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from dreamer_trl.replay import StepReplay
from dreamer_trl.transforms import INCOMING_REWARD

L, B = 4, 3  # steps per sequence, sequences per batch


def transitions(first: int, n: int) -> TensorDict:
    """``n`` mid-episode transitions whose observations number the steps first..first+n-1."""
    k = torch.arange(first, first + n, dtype=torch.float32).unsqueeze(-1)
    false = torch.zeros(n, 1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": k,
            "action": torch.zeros(n, 1),
            "is_init": (k == 0),
            INCOMING_REWARD: torch.zeros(n, 1),
            "next": {
                "observation": k + 1,
                "reward": torch.zeros(n, 1),
                "done": false,
                "terminated": false,
                "truncated": false,
                "deter": torch.zeros(n, 2),
                "stoch": torch.zeros(n, 2, 2),
            },
        },
        [n],
    )


def make(capacity: int = 100, online: bool = True) -> StepReplay:
    return StepReplay(capacity, B, L, ["observation"], storage="tensor", online=online)


def rows(batch) -> list[list[int]]:
    return batch["observation"][..., 0].long().tolist()


def consecutive(row: list[int]) -> bool:
    return row == list(range(row[0], row[0] + L))


def test_fresh_sequences_come_first_then_uniform():
    replay = make()
    replay.extend(transitions(0, 10))
    assert len(replay.queue) == 2  # steps 0-3 and 4-7; 8-9 wait for two more
    batch = replay.sample()
    got = rows(batch)
    assert got[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert consecutive(got[2])
    index = batch["index"].reshape(B, L)  # storage rows, as write_back uses them
    assert rows(replay.buffer.storage[index[0]].unsqueeze(0)) == [[0, 1, 2, 3]]
    assert all(consecutive(r) for r in rows(replay.buffer.storage[index[2]].unsqueeze(0)))
    assert not replay.queue and all(consecutive(r) for r in rows(replay.sample()))
    replay.extend(transitions(10, 2))
    assert rows(replay.sample())[0] == [8, 9, 10, 11]


def test_online_off_keeps_no_queue():
    replay = make(online=False)
    replay.extend(transitions(0, 10))
    assert not replay.queue
    assert all(consecutive(r) for r in rows(replay.sample()))


def test_streams_are_cut_separately():
    replay = make()
    replay.extend(transitions(0, 3), stream=0)
    replay.extend(transitions(100, 4), stream=1)
    replay.extend(transitions(3, 3), stream=0)
    assert rows(replay.sample())[:2] == [[100, 101, 102, 103], [0, 1, 2, 3]]


def test_at_most_b_fresh_sequences_per_batch():
    replay = make()
    replay.extend(transitions(0, 5 * L))
    first, second = rows(replay.sample()), rows(replay.sample())
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert second[:2] == [[12, 13, 14, 15], [16, 17, 18, 19]] and consecutive(second[2])


def test_sequence_overwritten_before_its_turn_is_dropped():
    replay = make(capacity=2 * L)
    replay.extend(transitions(0, 3 * L))  # steps 8-11 overwrote 0-3 in the circular storage
    assert rows(replay.sample())[:2] == [[4, 5, 6, 7], [8, 9, 10, 11]]


def test_queue_survives_a_checkpoint_round_trip():
    replay = make()
    replay.extend(transitions(0, 6))
    again = make()
    again.buffer.extend(replay.buffer.storage[torch.arange(len(replay))])
    again.load_state_dict(replay.state_dict())
    assert list(again.queue) == list(replay.queue) and again._pending == replay._pending
    again.extend(transitions(6, 2))
    assert rows(again.sample())[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    legacy = {"stream_steps": {0: 6}, "capacity": 100}  # written before the queue existed
    again.load_state_dict(legacy)
    assert not again.queue and not again._pending
