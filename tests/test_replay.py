"""StepReplay's online queue (SPEC.md, Replay): each stream's fresh steps form consecutive,
non-overlapping sequences that batches take first; the rest of a batch is uniform. And its
sampler index (issue 20): write-backs and extends cost no rebuild, and samples stay valid."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from dreamer_trl.replay import PendingWrite, StepReplay, StreamSliceSampler, pinned_copy
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


# ---- the sampler's index and the replay-context write-back (issue 20) --------------------
EP = 7  # steps per episode in episodes(): boundaries fall inside most slices


def episodes(first: int, n: int, deter: int = 2) -> TensorDict:
    """``n`` transitions numbered first..first+n-1, an episode ending every EP of them."""
    k = torch.arange(first, first + n, dtype=torch.float32).unsqueeze(-1)
    done = (k + 1) % EP == 0
    return TensorDict(
        {
            "observation": k,
            "action": torch.zeros(n, 1),
            "is_init": k % EP == 0,
            INCOMING_REWARD: torch.zeros(n, 1),
            "next": {
                "observation": k + 1,
                "reward": torch.zeros(n, 1),
                "done": done,
                "terminated": done,
                "truncated": torch.zeros_like(done),
                "deter": torch.zeros(n, deter),
                "stoch": torch.zeros(n, 2, 2),
            },
        },
        [n],
    )


def count_rebuilds(replay: StepReplay, monkeypatch) -> list[int]:
    """Calls of the sampler's full index rebuild (TorchRL's or ours)."""
    calls = []
    sampler = replay.buffer.sampler
    if isinstance(sampler, StreamSliceSampler):
        inner, name = sampler, "_rebuild"
    else:
        replay.sample()  # TorchRL builds its index object on the first sample
        inner, name = sampler._fragmented_index, "_full_rebuild"
    original = getattr(inner, name)
    monkeypatch.setattr(inner, name, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def assert_valid_slices(batch) -> None:
    """Each row: one stream, consecutive steps, is_first exactly at episode starts."""
    stream, step = batch["stream"], batch["stream_step"]
    assert (stream == stream[:, :1]).all()
    assert (step.diff(dim=1) == 1).all()
    obs, last = batch["observation"][..., 0], batch["is_last"]
    assert torch.equal(batch["is_first"], (obs % EP == 0) & ~last)


@pytest.mark.parametrize("sampler", ["stream", "slice"])
def test_write_back_rebuilds_no_index_and_later_samples_read_it(tmp_path, monkeypatch, sampler):
    replay = StepReplay(
        200, B, 9, ["observation"], scratch_dir=str(tmp_path), online=False, sampler=sampler
    )
    replay.extend(episodes(0, 60), stream=0)
    replay.extend(episodes(0, 45), stream=1)
    replay.sample()
    rebuilds = count_rebuilds(replay, monkeypatch)
    written = torch.zeros(200)  # the value last written back to each storage row
    for update in range(1, 30):
        batch = replay.sample()
        assert_valid_slices(batch)
        index = batch["index"].reshape(B, 9)
        context = index[:, 1:].reshape(-1)
        assert torch.equal(batch["deter"][:, 1:, 0].reshape(-1).float(), written[context])
        deter = torch.full((B, 8, 2), float(update))
        replay.write_back(batch, deter, torch.zeros(B, 8, 2, 2))
        written[context] = float(update)
    assert rebuilds == []


def test_extends_keep_the_index_without_a_rebuild_past_wraparound(monkeypatch):
    replay = StepReplay(50, B, 9, ["observation"], storage="tensor", online=False)
    replay.extend(episodes(0, 30))
    replay.sample()
    rebuilds = count_rebuilds(replay, monkeypatch)
    for first in range(30, 200, 10):  # the buffer wraps about four times
        replay.extend(episodes(first, 10))
        oldest = replay.buffer.storage._storage["stream_step"][: len(replay)].min()
        for _ in range(5):
            batch = replay.sample()
            assert_valid_slices(batch)
            assert (batch["stream_step"] >= oldest).all()  # no overwritten row is read
    assert rebuilds == []


def test_slices_are_uniform_over_all_windows():
    torch.manual_seed(0)
    replay = StepReplay(100, 50, 4, ["observation"], storage="tensor", online=False)
    replay.extend(transitions(0, 12), stream=0)  # 9 windows
    replay.extend(transitions(100, 6), stream=1)  # 3 windows
    starts = torch.cat([replay.sample()["observation"][:, 0, 0] for _ in range(60)])
    counts = torch.bincount(starts.long(), minlength=103)
    windows = list(range(9)) + [100, 101, 102]
    assert counts.sum() == counts[windows].sum() == 3000
    expected = 3000 / 12
    assert ((counts[windows] - expected).abs() < 0.25 * expected).all()


def test_writes_the_sampler_was_not_told_of_rebuild_it_once(tmp_path, monkeypatch):
    replay = StepReplay(100, B, L, ["observation"], scratch_dir=str(tmp_path / "a"))
    replay.extend(episodes(0, 40))
    replay.dumps(tmp_path / "dump")
    again = StepReplay(100, B, L, ["observation"], scratch_dir=str(tmp_path / "b"), online=False)
    again.loads(tmp_path / "dump")  # storage.set: TorchRL counts a write, no writer told
    rebuilds = count_rebuilds(again, monkeypatch)
    for _ in range(5):
        assert_valid_slices(again.sample())
    assert rebuilds == [1]


class FakeEvent:
    """A CUDA event's interface, done when the test says so."""

    def __init__(self):
        self.done, self.waited = False, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def deferred(replay: StepReplay, row: int, value: float) -> FakeEvent:
    """A write-back of ``value`` into ``row`` whose (GPU → host) copy is still running."""
    event = FakeEvent()
    values = {"deter": torch.full((1, 2), value, dtype=replay.latent_dtype)}
    replay.latents.pending.append(PendingWrite(torch.tensor([row]), values, event))
    return event


def stored_deter(replay: StepReplay, row: int) -> float:
    return float(replay.buffer.storage._storage["deter"][row, 0])


def test_deferred_write_backs_land_in_order_once_their_copies_finish(tmp_path):
    replay = make()
    replay.extend(transitions(0, 10))
    first, second = deferred(replay, 3, 1.0), deferred(replay, 3, 2.0)
    replay.sample()
    assert stored_deter(replay, 3) == 0.0  # copies not done: sampling does not wait
    second.done = True
    replay.sample()
    assert stored_deter(replay, 3) == 0.0 and len(replay.latents.pending) == 2  # in order
    first.done = True
    replay.sample()
    assert stored_deter(replay, 3) == 2.0 and not replay.latents.pending  # newer wins


def test_deferred_write_backs_are_waited_for_before_rows_are_overwritten_or_saved(tmp_path):
    replay = make()
    replay.extend(transitions(0, 10))
    event = deferred(replay, 4, 5.0)
    replay.extend(transitions(10, 2))
    assert event.waited and stored_deter(replay, 4) == 5.0
    event = deferred(replay, 5, 6.0)
    replay.dumps(tmp_path / "dump")
    assert event.waited and stored_deter(replay, 5) == 6.0


def test_batches_go_to_the_device_asked_for():
    replay = make()
    replay.extend(transitions(0, 10))
    assert replay.sample("cpu").device == torch.device("cpu")
    assert not pinned_copy("cpu", "cpu") and not pinned_copy(None, "cpu")
    assert pinned_copy("cpu", "cuda") == torch.cuda.is_available()
    assert not pinned_copy("cuda", "cuda")


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: 'stream', 'slice'"):
        StepReplay(10, B, L, ["observation"], storage="tensor", sampler="prioritized")


def test_a_gap_in_a_stream_splits_it_into_runs_and_slices_never_cross_it(monkeypatch):
    torch.manual_seed(0)
    replay = StepReplay(100, 40, L, ["observation"], storage="tensor", online=False)
    replay.extend(transitions(0, 10))
    replay.sample()
    rebuilds = count_rebuilds(replay, monkeypatch)
    replay.stream_steps[0] += 5  # steps 10-14 never arrive
    replay.extend(transitions(15, 10))
    batch = replay.sample()
    assert rebuilds == [1]  # the append did not continue the run: one rebuild
    steps = batch["stream_step"]
    assert (steps.diff(dim=1) == 1).all()
    assert {int(s) // 15 for s in steps[:, 0]} == {0, 1}  # both runs are sampled
    replay.extend(transitions(25, 10))  # the newer run grows again, incrementally
    assert (replay.sample()["stream_step"].diff(dim=1) == 1).all() and rebuilds == [1]
