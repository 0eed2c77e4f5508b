"""Freezing (``algo.train_world_model`` / ``train_actor`` / ``train_critic``): a frozen
part's parameters, its optimiser state and its own state stay bit for bit over updates
(LaProp's momentum must not move them), the other parts still train; and a tensor that
starts stepping late (a part unfrozen later) is bias-corrected from its own first step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tiny import MODEL
from torchrl.data import Bounded, Composite, Unbounded

from dreamer_trl.agent import PARTS, DreamerV3Agent
from dreamer_trl.optim import LaProp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = MODEL
FAST = {"optim": {"lr": 1e-3, "warmup": 0}, "imag_dtype": "float32"}
ADAM = {"optim": {"name": "adam", "model_lr": 1e-3, "actor_lr": 1e-3, "critic_lr": 1e-3}}


def make_agent(**algo) -> DreamerV3Agent:
    torch.manual_seed(0)
    return DreamerV3Agent.from_specs(
        Composite(observation=Unbounded(shape=(5,))),
        Bounded(low=-1.0, high=1.0, shape=(2,)),
        TINY,
        {**FAST, **algo},
    )


def batch(agent: DreamerV3Agent, seed: int, b: int = 2, t1: int = 9) -> TensorDict:
    """Replay steps [B, T+1]: random observations, actions and rewards, one episode."""
    g = torch.Generator().manual_seed(seed)
    rssm = agent.world_model.rssm
    first = torch.zeros(b, t1, dtype=torch.bool)
    first[:, 0] = True
    flag = torch.zeros(b, t1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": torch.randn(b, t1, 5, generator=g),
            "action": 2 * torch.rand(b, t1, 2, generator=g) - 1,
            "reward": torch.randn(b, t1, generator=g),
            "is_first": first,
            "is_last": flag,
            "is_terminal": flag.clone(),
            "deter": torch.zeros(b, t1, rssm.deter),
            "stoch": torch.zeros(b, t1, rssm.stoch, rssm.classes),
        },
        [b, t1],
    )


def snapshot(agent: DreamerV3Agent, part: str) -> dict:
    """Copies of a part's parameters, their optimiser state, and the part's own state."""
    params = list(getattr(agent, part).parameters())
    state = agent.optimizer.state
    out = {
        "params": [p.detach().clone() for p in params],
        "optim": [{k: _copy(v) for k, v in state[p].items()} for p in params],
    }
    if part == "critic":
        out["slow"] = [p.clone() for p in agent.loss.slow_critic.parameters()]
        out["slow_count"] = agent.loss.slow_critic.count
    if part == "actor":
        norm = agent.loss.return_norm
        out["retnorm"] = [norm.low.clone(), norm.high.clone()]
    return out


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def same(a, b) -> bool:
    """Bit-identical, recursively over lists and dicts of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def trained(agent: DreamerV3Agent, updates: int, seed: int = 0) -> DreamerV3Agent:
    for i in range(updates):
        agent.update(batch(agent, seed + i))
    return agent


@pytest.fixture(scope="module")
def warm():
    """An agent after 2 updates of every part: every tensor has optimiser moments, and a
    non-zero momentum that would move it on a zero-gradient step."""
    agent = trained(make_agent(), 2)
    return agent.state_dict(), agent.optimizer.state_dict()


@pytest.mark.parametrize("part", PARTS)
def test_a_frozen_part_stays_bit_identical(part, warm):
    agent = make_agent(**{f"train_{part}": False})
    agent.load_state_dict(warm[0])
    agent.optimizer.load_state_dict(warm[1])
    before = snapshot(agent, part)
    others = {p: [x.clone() for x in getattr(agent, p).parameters()] for p in PARTS if p != part}
    assert any(s["mu"].abs().sum() > 0 for s in before["optim"])  # momentum would move it
    trained(agent, 3, seed=10)
    assert same(snapshot(agent, part), before)
    assert all(not p.requires_grad for p in getattr(agent, part).parameters())
    for name, old in others.items():  # the other parts trained
        new = list(getattr(agent, name).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(old, new)), name


def test_a_part_frozen_from_the_start_gets_no_optimiser_state():
    agent = trained(make_agent(train_world_model=False, train_critic=False), 2)
    state = agent.optimizer.state
    assert all(p not in state for p in agent.world_model.parameters())
    assert all(p not in state for p in agent.critic.parameters())
    assert all(p in state for p in agent.actor.parameters())


def test_adam_leaves_a_frozen_part_alone(warm):
    a = trained(make_agent(**ADAM), 2)
    b = make_agent(**ADAM, train_world_model=False)
    b.load_state_dict(a.state_dict())
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    before = snapshot(b, "world_model")
    trained(b, 2, seed=20)
    assert same(snapshot(b, "world_model"), before)


@pytest.mark.parametrize("frozen", ["world_model", "critic"])
def test_dynamics_backprop_keeps_the_freeze(frozen):
    """paper2023's continuous actor backprops through the world model, which
    ``losses.frozen`` detaches for that loss and then unfreezes: a part frozen by config
    must stay frozen after it."""
    agent = make_agent(actor_grad="dynamics", **{f"train_{frozen}": False})
    before = snapshot(agent, frozen)
    trained(agent, 2)
    assert same(snapshot(agent, frozen), before)
    assert all(not p.requires_grad for p in getattr(agent, frozen).parameters())


def test_freezing_everything_is_refused():
    with pytest.raises(ValueError, match="no update would change anything"):
        make_agent(train_world_model=False, train_actor=False, train_critic=False)


def test_config_keys_and_rule():
    from pipelines.common import ConfigError, compose_config

    cfg = compose_config([])
    assert [cfg.algo[f"train_{p}"] for p in PARTS] == [True, True, True]
    paper = compose_config(["algo=dreamerv3_2023", "algo.train_actor=false"])
    assert paper.algo.train_actor is False
    off = [f"algo.train_{p}=false" for p in PARTS]
    with pytest.raises(ConfigError, match="at least one of the three true"):
        compose_config(off)


# --------------------------------------------------------------------------- LaProp


def grads(step: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def test_a_late_tensor_is_bias_corrected_from_its_own_first_step():
    """Tensor b takes its first gradient at update 11: its step equals a fresh LaProp's
    first step, and tensor a's steps equal those of a LaProp over a alone."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
    both = LaProp([pa, pb], lr=1e-2, warmup=0)
    alone_a = a.clone().requires_grad_()
    only_a = LaProp([alone_a], lr=1e-2, warmup=0)
    fresh_b = b.clone().requires_grad_()
    only_b = LaProp([fresh_b], lr=1e-2, warmup=0)
    for step in range(1, 12):
        ga, gb = grads(step, [(3, 4), (5,)])
        pa.grad, alone_a.grad = ga.clone(), ga.clone()
        pb.grad = gb.clone() if step == 11 else None  # b frozen for 10 updates
        both.step()
        only_a.step()
        if step == 11:
            fresh_b.grad = gb.clone()
            only_b.step()
        else:
            assert torch.equal(pb.detach(), b)  # untouched while frozen
    assert torch.equal(pa.detach(), alone_a.detach())
    assert torch.allclose(pb.detach(), fresh_b.detach(), rtol=0, atol=1e-15)
    assert both.state[pb]["start"] == 10 and both.state[pa]["start"] == 0
