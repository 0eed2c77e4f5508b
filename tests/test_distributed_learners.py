"""Data-parallel learners (``dreamer_trl.distributed``): two gloo ranks stay one agent, and
that agent is the one a single process gets from the ranks' batches concatenated."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_agent import make_batch

from dreamer_trl.agent import DreamerV3Agent
from dreamer_trl.distributed import World
from dreamer_trl.world_model import ObsSpace

MODEL = dict(deter=32, hidden=16, classes=4, units=16, depth=2)
# eps 1e-4, not the reference's 1e-20: with it LaProp's step is ±lr for any gradient
# however small, so rounding in a near-zero gradient (the untrained actor's are ~1e-9, sums
# of cancelling terms summed in another order) would flip whole steps; the gradients
# themselves are compared at the reference's setting below.
# float32 imagination: with bf16 (the default where the CPU has bf16 units) a batch of 2B
# and two of B round differently (the kernels block by batch size), ~1e-3 of a gradient;
# what is compared here is the all-reduce's arithmetic, not bf16 rounding.
ALGO = {"optim": {"lr": 1e-3, "warmup": 0, "eps": 1e-4}, "imag_horizon": 5,
        "imag_dtype": "float32"}
B, T1, UPDATES = 3, 9, 3


def build(seed: int) -> DreamerV3Agent:
    torch.manual_seed(seed)
    return DreamerV3Agent(ObsSpace({"observation": 5}, {}), 2, False, MODEL, ALGO)


def batch(agent: DreamerV3Agent, rank: int, update: int):
    g = torch.Generator().manual_seed(100 * update + rank)
    obs = torch.randn(B, T1, 5, generator=g)
    return make_batch(agent, {"observation": obs}, B, T1, seed=100 * update + rank)


@contextlib.contextmanager
def noise_free():
    """Uniforms 0.5 and normals 0: sampling becomes a function of each row alone, so a
    batch of 2B draws what two batches of B draw (with noise, the draws' order differs)."""
    rand, randn_like = torch.rand, torch.randn_like

    def half(*size, device=None, dtype=None, **_):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        return torch.full(shape, 0.5, device=device, dtype=dtype or torch.float32)

    torch.rand, torch.randn_like = half, lambda x, **_: torch.zeros_like(x)
    try:
        yield
    finally:
        torch.rand, torch.randn_like = rand, randn_like


def grads(agent: DreamerV3Agent) -> list[torch.Tensor]:
    """The last update's gradients (averaged over ranks in a data-parallel agent)."""
    return [p.grad.clone() for m in agent.trained_modules() for p in m.parameters()]


def state(agent: DreamerV3Agent) -> dict[str, torch.Tensor]:
    out = {f"agent.{k}": v.clone() for k, v in agent.state_dict().items() if torch.is_tensor(v)}
    opt = agent.optimizer.state_dict()["state"]
    for i, s in opt.items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return out


def _rank(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        agent = build(seed=rank)  # different initial weights: data_parallel must align them
        agent.data_parallel(World(rank, size, rank))
        batches = [batch(agent, rank, k) for k in range(UPDATES)]
        with noise_free():
            agent.update(batches[0])
            first = grads(agent)
            for b in batches[1:]:
                agent.update(b)
        torch.save({"state": state(agent), "grads": first}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(2, f"file://{tmp / 'init'}", str(tmp)), nprocs=2, join=True)
    return torch.load(tmp / "rank0.pt"), torch.load(tmp / "rank1.pt")


def test_ranks_stay_bit_identical(two_ranks):
    (r0, g0), (r1, g1) = [(r["state"], r["grads"]) for r in two_ranks]
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert r0.keys() == r1.keys()
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, differ[:5]


def test_ranks_equal_one_process_on_the_concatenated_batches(two_ranks):
    r0, g0 = two_ranks[0]["state"], two_ranks[0]["grads"]
    agent = build(seed=0)
    batches = [
        torch.cat([batch(agent, 0, k), batch(agent, 1, k)]) for k in range(UPDATES)
    ]
    start = state(build(seed=0))
    with noise_free():
        agent.update(batches[0])
        first = grads(agent)
        for b in batches[1:]:
            agent.update(b)
    # The first update starts from the same weights: its averaged gradient is the
    # concatenated batch's gradient, tensor by tensor (relative to the tensor's scale).
    for a, b in zip(first, g0):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-12
    single = state(agent)
    moved = [k for k in single if k.startswith("agent.") and not torch.equal(single[k], start[k])]
    assert len(moved) > 20  # the updates did change the weights being compared
    weights = max((single[k] - r0[k]).abs().max().item() for k in single if k[:6] == "agent.")
    assert weights < 1e-5, weights
    # LaProp's first moment is the EMA of g / sqrt(nu): where nu is tiny, a gradient's
    # last-bit difference (its sum taken in another order) shows magnified, so the moments
    # are compared relative to their scale (0.35 here; measured differences <= 5e-5 of it).
    for k in (k for k in single if k.startswith("opt.")):
        assert (single[k] - r0[k]).abs().max() <= 2e-4 * single[k].abs().max() + 1e-12, k
    norm = "agent.loss.actor_loss.return_norm"
    assert torch.allclose(single[f"{norm}.high"], r0[f"{norm}.high"], atol=1e-6)
    assert single[f"{norm}.high"].abs().item() > 0  # the normaliser saw returns


def test_single_process_world_changes_nothing():
    agent = build(seed=0)
    agent.data_parallel(World())
    assert agent.grad_average is None
    assert agent.loss.actor_loss.return_norm.gather is None
    assert os.environ.get("WORLD_SIZE", "1") == "1"


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from dreamer_trl.distributed import init_world

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 CUDA device\(s\)"):
        init_world(World(0, 2, 0), torch.device("cuda"))
    assert not dist.is_initialized()


def test_a_lost_peer_is_told_from_a_bug():
    from dreamer_trl.distributed import lost_peer

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read "
            "error [127.0.0.1]:3752: Connection reset by peer.")
    assert lost_peer(RuntimeError(gloo))
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
