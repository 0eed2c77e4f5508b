"""algo=dreamerv3_2023 against the 2023 code (danijar/dreamerv3 at 8fa35f8): each structural
option on small hand-checked cases, and the parameter count of the 2023 code's size S
computed by hand from its configs.yaml and nets.py (docs/architecture.md, "algo=dreamerv3_2023
vs the 2023 code")."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict

from dreamer_trl.agent import DreamerV3Agent
from dreamer_trl.heads import Actor
from dreamer_trl.losses import discounts
from dreamer_trl.nets import (
    HiddenLayer,
    HiddenSpec,
    Linear,
    StrideConvDecoder,
    StrideConvEncoder,
    apply_init,
    fan_avg_init_,
)
from dreamer_trl.rssm import RSSM
from dreamer_trl.world_model import ObsSpace, WorldModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.common import compose_config  # noqa: E402

SPEC_2023 = HiddenSpec("layer", 1e-3, False)
# The 2023 code's size S (its `small`, and what dmc_proprio/dmc_vision/atari100k set).
SIZE_S = dict(deter=512, hidden=512, classes=32, depth=32, units=512)
TINY = dict(deter=32, hidden=16, classes=4, depth=4, units=16)


@functools.cache
def _composed(*overrides: str) -> DictConfig:
    return compose_config(list(overrides)).algo


def algo_2023(**tiny) -> dict:
    """The composed algo=dreamerv3_2023; ``tiny`` overrides keys (tests that need no 1024
    units set ``vector_units``: initialising 5 x 1024^2 weights takes seconds here)."""
    return {**OmegaConf.to_container(_composed("algo=dreamerv3_2023")), **tiny}


def algo_2023_tiny() -> dict:
    return algo_2023(vector_units=32)


def algo_reference() -> dict:
    return OmegaConf.to_container(_composed())


# --------------------------------------------------------------------------- the config


def test_2023_config_selects_the_2023_structure():
    algo = algo_2023()
    assert algo["repval"] is False
    assert (algo["gru"], algo["initial"], algo["init"], algo["cnn"], algo["cont"]) == (
        "plain",
        "learned",
        "fan_avg",
        "stride",
        "mode",
    )
    assert (algo["norm"], algo["norm_eps"], algo["hidden_bias"]) == ("layer", 1e-3, False)
    assert algo["actor"]["outscale"] == 1.0 and algo["actor"]["unimix"] == 0.01
    ref = algo_reference()  # the reference keeps its structure
    assert (ref["gru"], ref["initial"], ref["init"], ref["cnn"], ref["cont"]) == (
        "block",
        "zeros",
        "fan_in",
        "maxpool",
        "prob",
    )
    assert ref["actor"]["unimix"] == 0.0 and ref["hidden_bias"] is True


def _hidden_widths(mlp) -> list[int]:
    return [m.linear.out_features for m in mlp if isinstance(m, HiddenLayer)]


def test_layer_counts_per_head():
    """The 2023 code at size S: encoder/decoder 5 x 1024 (configs.yaml mlp_layers 5,
    mlp_units 1024, which its size presets leave alone), reward/cont/actor/critic 2 x 512,
    prior and posterior one hidden layer each. The reference: 3/3/1/1/3/3, prior 2."""
    for algo, want in (
        (algo_2023(), dict(enc=[1024] * 5, dec=[1024] * 5, head=[512] * 2, ac=[512] * 2, prior=1)),
        (algo_reference(), dict(enc=[512] * 3, dec=[512] * 3, head=[512], ac=[512] * 3, prior=2)),
    ):
        with torch.device("meta"):
            agent = DreamerV3Agent(ObsSpace({"observation": 24}, {}), 6, False, SIZE_S, algo)
        wm = agent.world_model
        assert _hidden_widths(wm.encoder.mlp) == want["enc"]
        assert _hidden_widths(wm.decoder.mlp) == want["dec"]
        assert _hidden_widths(wm.reward.mlp) == _hidden_widths(wm.cont.mlp) == want["head"]
        assert _hidden_widths(agent.actor.mlp) == _hidden_widths(agent.critic.mlp) == want["ac"]
        assert len(wm.rssm.prior_net) == want["prior"] and len(wm.rssm.post_net) == 1


# --------------------------------------------------------------------------- parameter count


def _lin(fan_in: int, units: int, norm: bool) -> int:
    """The 2023 code's Linear: a kernel, plus a bias where no norm follows, else the
    LayerNorm's scale and shift (nets.py Linear: bias = bias and norm == 'none')."""
    return fan_in * units + (2 * units if norm else units)


def _conv(cin: int, cout: int, norm: bool) -> int:
    return 4 * 4 * cin * cout + (2 * cout if norm else cout)  # k4 kernels, as _lin


def _params_2023_size_s(obs: int, image: bool, act: int) -> tuple[int, int, int]:
    """(world model, actor, critic) of the 2023 code's size S, by hand from its configs.yaml
    (rssm deter 512 units 512 stoch 32 classes 32; encoder/decoder mlp 5 x 1024, cnn_depth
    32, minres 4; heads 2 x 512; outputs: reward/critic 255 bins, actor mean + std layers)."""
    d, h, z, units, depth = 512, 512, 32 * 32, 512, 32
    feat = d + z
    embed = 0
    enc = dec = 0
    if obs:  # vector observations: one per DMC key for walker (14 + 1 + 9 = 24)
        enc += _lin(obs, 1024, True) + 4 * _lin(1024, 1024, True)
        dec += _lin(feat, 1024, True) + 4 * _lin(1024, 1024, True)
        dec += sum(_lin(1024, k, False) for k in (14, 1, 9))
        embed += 1024
    if image:  # 64x64x3: 4 stride-2 stages of depth 32, 64, 128, 256 down to 4x4
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        enc += sum(_conv(a, b, True) for a, b in zip(chans[:-1], chans[1:]))
        embed += 4 * 4 * 8 * depth
        dec += _lin(feat, 4 * 4 * 8 * depth, False)  # the decoder's 'in' layer: no norm
        back = chans[::-1]
        dec += sum(_conv(a, b, True) for a, b in zip(back[:-2], back[1:-1]))
        dec += _conv(back[-2], back[-1], False)
    rssm = (
        _lin(z + act, h, True)  # img_in
        + _lin(d + h, 3 * d, True)  # gru
        + _lin(d, h, True)  # img_out (prior)
        + _lin(h, z, False)  # img_stats
        + _lin(d + embed, h, True)  # obs_out (posterior)
        + _lin(h, z, False)  # obs_stats
        + d  # the learned initial deter
    )
    mlp2 = _lin(feat, units, True) + _lin(units, units, True)
    reward, cont = mlp2 + _lin(units, 255, False), mlp2 + _lin(units, 1, False)
    actor = mlp2 + 2 * _lin(units, act, False)
    critic = mlp2 + _lin(units, 255, False)
    return enc + rssm + dec + reward + cont, actor, critic


@pytest.mark.parametrize("kind", ["proprio", "vision"])
def test_parameter_count_equals_the_2023_code_size_s(kind):
    """Walker at the 2023 code's size S: dmc_proprio (24 vector dims) 18,708,003 parameters
    and dmc_vision (64x64 RGB); the world model's count is what its model_opt printed."""
    vectors = {"observation": 24} if kind == "proprio" else {}
    images = {"pixels": (3, 64, 64)} if kind == "vision" else {}
    with torch.device("meta"):
        agent = DreamerV3Agent(ObsSpace(vectors, images), 6, False, SIZE_S, algo_2023())
    want = _params_2023_size_s(24 if vectors else 0, bool(images), 6)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(agent.world_model), count(agent.actor), count(agent.critic)) == want
    if kind == "proprio":
        assert want == (16_469_784, 1_056_780, 1_181_439) and agent.num_params() == 18_708_003


# --------------------------------------------------------------------------- the GRU


def _layer_norm(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, eps: float) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + shift


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _plain_rssm(initial: str = "zeros") -> RSSM:
    torch.manual_seed(0)
    kw = dict(deter=6, hidden=4, stoch=3, classes=2, norm=SPEC_2023)
    rssm = RSSM(2, 5, **kw, gru="plain", initial=initial).double()
    with torch.no_grad():  # non-trivial norm scales and shifts: a layout slip cannot hide
        for name, p in rssm.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return rssm


def test_plain_gru_matches_the_2023_cell_in_numpy():
    """2023 nets.py RSSM.img_step/_gru: x = SiLU(LN(W_in [z, a])); [r, c, u] = LN(W [h, x])
    (one LayerNorm over all 3·D, no bias, no activation); c = tanh(σ(r)·c); u = σ(u − 1);
    h' = u·c + (1 − u)·h. Actions are first divided by max(1, |a|)."""
    rssm = _plain_rssm()
    names = {n for n, _ in rssm.named_parameters()}
    assert "img_in.linear.bias" not in names and "gru.bias" not in names  # norm follows
    assert not any(n.startswith(("dynin", "dynhid", "dyngru")) for n in names)
    assert tuple(rssm.gru.weight.shape) == (18, 6 + 4)
    torch.manual_seed(1)
    deter = torch.randn(3, 6, dtype=torch.float64)
    stoch = F.one_hot(torch.randint(0, 2, (3, 3)), 2).double()
    action = 3 * torch.randn(3, 2, dtype=torch.float64)
    out = rssm.core(deter, stoch, rssm.embed_action(action))

    p = {n: t.detach().numpy() for n, t in rssm.named_parameters()}
    h, a = deter.numpy(), action.numpy()
    a = a / np.maximum(1.0, np.abs(a))
    x = np.concatenate([stoch.flatten(-2).numpy(), a], -1) @ p["img_in.linear.weight"].T
    x = _layer_norm(x, p["img_in.norm.weight"], p["img_in.norm.bias"], 1e-3)
    x = x * _sigmoid(x)  # SiLU
    g = np.concatenate([h, x], -1) @ p["gru.weight"].T
    g = _layer_norm(g, p["gru_norm.weight"], p["gru_norm.bias"], 1e-3)
    r, c, u = np.split(g, 3, -1)
    c = np.tanh(_sigmoid(r) * c)
    u = _sigmoid(u - 1)
    np.testing.assert_allclose(out.detach().numpy(), u * c + (1 - u) * h, rtol=1e-9, atol=1e-9)
    d2, _ = rssm.img_step(deter, stoch, action)
    torch.testing.assert_close(d2, out)


def test_plain_gru_with_zero_weights_keeps_one_minus_sigmoid_of_minus_one():
    """By hand: zero weights and norm shifts make every gate 0, so r = σ(0), c = tanh(0) = 0
    and u = σ(0 − 1): h' = (1 − σ(−1))·h = 0.7311·h."""
    rssm = _plain_rssm()
    with torch.no_grad():
        for p in rssm.parameters():
            p.zero_()
    deter = torch.randn(2, 6, dtype=torch.float64)
    out = rssm.core(
        deter,
        torch.zeros(2, 3, 2, dtype=torch.float64),
        rssm.embed_action(torch.ones(2, 2, dtype=torch.float64)),
    )
    torch.testing.assert_close(out, (1 - 1 / (1 + math.e)) * deter)


# --------------------------------------------------------------------------- initial state


def test_learned_initial_state_is_a_parameter_used_at_is_first():
    """2023 nets.py RSSM.initial ('learned'): deter = tanh(w), w a zero-initialised
    parameter; stoch = the prior's mode there. obs_step: at is_first the carried state is
    replaced by it and the previous action zeroed."""
    rssm = _plain_rssm("learned")
    assert dict(rssm.named_parameters())["initial_deter"].shape == (6,)
    assert (rssm.initial_deter == 0).all()
    with torch.no_grad():
        rssm.initial_deter.copy_(torch.randn(6, dtype=torch.float64))
    d0, s0 = rssm.initial(2)
    torch.testing.assert_close(d0, torch.tanh(rssm.initial_deter).expand(2, 6))
    logits = rssm.prior_logit(rssm.prior_net(d0)).unflatten(-1, (3, 2))
    assert torch.equal(s0, F.one_hot(logits.argmax(-1), 2).double())

    torch.manual_seed(2)
    tokens = torch.randn(2, 2, 5, dtype=torch.float64)
    action = torch.randn(2, 2, 2, dtype=torch.float64)
    deter, stoch = torch.randn(2, 6, dtype=torch.float64), torch.ones(2, 3, 2).double()
    first = torch.tensor([[True, False], [False, False]])
    d, _, post = rssm.observe(tokens, action, first, deter, stoch)
    # Row 0 restarts from the learned state with no action; row 1 carries its state.
    want = rssm.core(d0[:1], s0[:1], rssm.embed_action(torch.zeros(1, 2).double()))
    torch.testing.assert_close(d[0, 0], want[0])
    carried = rssm.core(deter[1:], stoch[1:], rssm.embed_action(action[1:, 0]))
    torch.testing.assert_close(d[1, 0], carried[0])
    # The parameter learns from the restarted rows only.
    d[1].sum().backward()
    assert rssm.initial_deter.grad is None or (rssm.initial_deter.grad == 0).all()
    d, _, _ = rssm.observe(tokens, action, first, deter, stoch)
    d[0].sum().backward()
    assert rssm.initial_deter.grad.abs().sum() > 0


def test_zero_initial_state_has_no_parameter():
    rssm = RSSM(2, 5, deter=8, hidden=4, stoch=3, classes=2, blocks=2)
    assert "initial_deter" not in dict(rssm.named_parameters())
    d0, s0 = rssm.initial(2)
    assert not d0.any() and not s0.any()


# --------------------------------------------------------------------------- init


def test_fan_avg_init_statistics():
    """2023 jaxutils/nets.py Initializer(fan='avg'): hidden layers (winit normal) are
    trunc-normal ±2 with variance 1/fan_avg; output layers (built without the layer options:
    winit uniform) are U(±sqrt(3·outscale/fan_avg)); outscale 0 gives zeros. Each output
    part (the actor's mean and std layers) has its own fan-out."""
    torch.manual_seed(0)
    hidden = HiddenLayer(300, 500, SPEC_2023)
    out = Linear(300, 100, outscale=0.5)
    zero = Linear(300, 255, outscale=0.0)
    split = Linear(100, 202)
    split.out_parts = (2, 200)
    conv = StrideConvEncoder(3, 64, 8, SPEC_2023).convs[1]  # 8 -> 16 channels, k4
    for m in (hidden, out, zero, split, conv):
        fan_avg_init_(m)
    w, fan = hidden.linear.weight, (300 + 500) / 2
    assert abs(w.std().item() / math.sqrt(1 / fan) - 1) < 0.02
    assert w.abs().max().item() <= 2 * math.sqrt(1 / fan) / 0.8796256610342398 + 1e-6
    assert hidden.linear.bias is None  # LayerNorm's shift instead
    limit = math.sqrt(3 * 0.5 / ((300 + 100) / 2))
    assert out.weight.abs().max().item() <= limit and out.weight.abs().max().item() > 0.99 * limit
    assert abs(out.weight.std().item() / (limit / math.sqrt(3)) - 1) < 0.03
    assert not zero.weight.any()
    lim_a, lim_b = math.sqrt(3 / 51), math.sqrt(3 / 150)
    assert lim_b < split.weight[:2].abs().max().item() <= lim_a
    assert split.weight[2:].abs().max().item() <= lim_b
    fan = 16 * (8 + 16) / 2
    assert abs(conv.weight.std().item() / math.sqrt(1 / fan) - 1) < 0.05


def test_fan_in_init_is_left_as_built():
    torch.manual_seed(0)
    layer = HiddenLayer(40, 30)
    before = layer.linear.weight.clone()
    apply_init(layer, "fan_in")
    assert torch.equal(layer.linear.weight, before)
    with pytest.raises(ValueError, match="fan_avg"):
        apply_init(layer, "orthogonal")


def test_2023_world_model_output_layers_start_as_the_2023_code():
    """Reward and critic outputs zero (outscale 0), actor outputs uniform at outscale 1.0
    (2023 configs.yaml actor outscale 1.0; the reference: 0.01)."""
    torch.manual_seed(0)
    agent = DreamerV3Agent(ObsSpace({"observation": 8}, {}), 3, False, TINY, algo_2023_tiny())
    assert not agent.world_model.reward.out.weight.any() and not agent.critic.out.weight.any()
    w = agent.actor.out.weight  # mean rows then std rows, each fan_avg = (16 + 3)/2
    assert w.abs().max().item() <= math.sqrt(3 / 9.5) and w.std().item() > 0.2
    assert agent.world_model.rssm.gru.hidden and not agent.world_model.rssm.prior_logit.hidden


# --------------------------------------------------------------------------- heads and CNN


def test_discrete_actor_unimix():
    """2023 nets.py Dist 'onehot' with actor unimix 0.01: probs = 0.99·softmax + 0.01/A."""
    torch.manual_seed(0)
    actor = Actor(8, 4, True, 16, 2, outscale=1.0, unimix=0.01)
    feat = torch.randn(5, 8)
    logits = actor.out(actor.mlp(feat))
    want = 0.99 * torch.softmax(logits, -1) + 0.01 / 4
    torch.testing.assert_close(actor(feat).exp(), want)
    plain = Actor(8, 4, True, 16, 2, outscale=1.0)
    plain.load_state_dict(actor.state_dict())
    torch.testing.assert_close(plain(feat).exp(), torch.softmax(logits, -1))


def test_stride_cnn_shapes():
    """2023 ImageEncoderResnet/ImageDecoderResnet (resize stride, blocks 0, minres 4): k4
    stride-2 stages doubling the depth down to 4x4, and back; decoder output x + 0.5."""
    enc = StrideConvEncoder(3, 64, 4, SPEC_2023)
    assert [c.out_channels for c in enc.convs] == [4, 8, 16, 32]
    assert all(c.bias is None for c in enc.convs)  # LayerNorm follows
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert enc(img).shape == (2, enc.out_features) == (2, 32 * 4 * 4)
    dec = StrideConvDecoder(20, 3, 64, 4, SPEC_2023)
    assert [c.out_channels for c in dec.convs] + [dec.out.out_channels] == [16, 8, 4, 3]
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
    out = dec(torch.randn(2, 12), torch.randn(2, 8))
    assert out.shape == (2, 3, 64, 64) and (out == 0.5).all()
    with pytest.raises(ValueError, match="4·2"):
        StrideConvEncoder(3, 48, 4)


# --------------------------------------------------------------------------- continue


def test_continue_mode_target_and_discounts():
    """2023 agent.py: the continue target is 1 − is_terminal; imagine() uses the head's mode
    times γ = 1 − 1/horizon, the start state's real flag, and weight cumprod(γ·cont)/γ."""
    wm = WorldModel(ObsSpace({"observation": 3}, {}), 2, **TINY, blocks=8, cont="mode")
    term = torch.tensor([False, True])
    assert wm.cont_target(term).tolist() == [1.0, 0.0]
    g = 1 - 1 / 333
    prob = torch.tensor([[0.2, 0.7, 0.4, 0.9], [0.9, 0.9, 0.9, 0.9]])
    cont, weight = discounts(wm, prob, torch.tensor([False, True]))
    torch.testing.assert_close(cont, torch.tensor([[g, g, 0, g], [0, g, g, g]]))
    torch.testing.assert_close(weight, torch.tensor([[1, g, 0, 0], [0, 0, 0, 0.0]]))
    ref = WorldModel(ObsSpace({"observation": 3}, {}), 2, **TINY, blocks=8)
    torch.testing.assert_close(ref.cont_target(term), torch.tensor([g, 0.0]))
    cont, weight = discounts(ref, prob, None)
    assert cont is prob and torch.equal(weight, torch.cumprod(prob, 1))


# --------------------------------------------------------------------------- the agent


def _batch(agent: DreamerV3Agent, b: int = 2, t1: int = 6) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    rssm, space = agent.world_model.rssm, agent.obs_space
    obs = {k: torch.randn(b, t1, n, generator=g) for k, n in space.vectors.items()}
    for k, shape in space.images.items():
        obs[k] = torch.randint(0, 256, (b, t1, *shape), generator=g, dtype=torch.uint8)
    if agent.discrete:
        action = F.one_hot(
            torch.randint(0, agent.action_dim, (b, t1), generator=g), agent.action_dim
        )
    else:
        action = 2 * torch.rand(b, t1, agent.action_dim, generator=g) - 1
    first = torch.zeros(b, t1, dtype=torch.bool)
    first[:, 0] = first[:, 3] = True
    flags = torch.zeros(b, t1, dtype=torch.bool)
    return TensorDict(
        {
            **obs,
            "action": action.float(),
            "reward": torch.randn(b, t1, generator=g),
            "is_first": first,
            "is_last": flags,
            "is_terminal": flags,
            "deter": torch.zeros(b, t1, rssm.deter),
            "stoch": torch.zeros(b, t1, rssm.stoch, rssm.classes),
        },
        [b, t1],
    )


@pytest.mark.parametrize("discrete", [False, True])
def test_2023_agent_updates_without_replay_value_loss(discrete):
    """The whole 2023 variant trains on vectors and 64x64 images; repval is off (2023 has
    no replay value loss), so no loss_repval entry exists and its scale is never read."""
    torch.manual_seed(0)
    space = ObsSpace({"observation": 5}, {"pixels": (3, 64, 64)})
    agent = DreamerV3Agent(space, 3, discrete, TINY, algo_2023_tiny())
    before = [p.clone() for p in agent.world_model.rssm.parameters()]
    for _ in range(2):
        out = agent.update(_batch(agent))
    assert "loss_repval" not in out.keys() and "loss_policy" in out.keys()
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss_"))
    moved = [not torch.equal(a, b) for a, b in zip(before, agent.world_model.rssm.parameters())]
    assert all(moved)  # every RSSM parameter, the learned initial deter included


def test_dynamics_backprop_loss_subtracts_the_value_baseline_with_its_graph():
    """2023 agent.py ImagActorCritic.loss, 'backprop': −w·((R − v)/S + η·H) with v = the
    critic on the imagined states, not stopped."""
    torch.manual_seed(0)
    agent = DreamerV3Agent(ObsSpace({"observation": 5}, {}), 2, False, TINY, algo_2023_tiny())
    actor_loss = agent.loss.actor_loss
    assert actor_loss.actor_grad == "dynamics"
    rssm = agent.world_model.rssm
    deter, stoch = rssm.initial(4)
    img = actor_loss.rollout(deter, stoch)
    assert img.value.requires_grad
    loss, _ = actor_loss.policy_terms(img, update_norm=False)
    scale = actor_loss.return_norm(img.ret, update=False)
    ent = agent.actor.entropy(img.extra["actor_params"])
    adv = (img.ret - img.value[:, :-1]) / scale
    want = (img.weight[:, :-1] * -(adv + actor_loss.entropy * ent)).mean(1)
    torch.testing.assert_close(loss, want)


# --------------------------------------------------------------------------- the schema


def test_schema_choices_are_the_librarys_and_the_stride_cnn_needs_4_times_2_to_the_k():
    from dreamer_trl import nets, rssm, world_model
    from pipelines.common import ConfigError
    from pipelines.config_schema import schema_keys, validate

    keys = schema_keys()
    for key, choices in (
        ("algo.gru", rssm.GRUS),
        ("algo.initial", rssm.INITIALS),
        ("algo.init", nets.INITS),
        ("algo.cnn", world_model.CNNS),
        ("algo.cont", world_model.CONTS),
    ):
        assert keys[key]["choices"] == choices, key
    cfg = OmegaConf.to_container(compose_config(["algo=dreamerv3_2023", "env.image_size=128"]))
    validate(cfg)
    cfg["env"]["image_size"] = 96
    with pytest.raises(ConfigError, match=r"^algo.cnn=stride is invalid: needs env.image_size"):
        validate(cfg)
