"""The DreamerV3 objective: stop-gradients, free nats, gradient routing of the actor, critic
and replay-value losses, continue targets, loss scales, return normaliser, slow critic and
the replay step layout (SPEC.md: World model › KL / Loss; Actor and critic; Known pitfalls)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tensordict import TensorDict

from dreamer_trl.actor_critic import Critic, ReturnNormalizer, SlowCritic
from dreamer_trl.agent import DreamerV3Agent
from dreamer_trl.distributions import binary_log_prob, categorical_kl
from dreamer_trl.functional import lambda_return
from dreamer_trl.losses import DEFAULT_SCALES, Imagination, total_loss
from dreamer_trl.nets import trunc_normal_
from dreamer_trl.sequence import sequence_from_steps, transitions_to_steps
from dreamer_trl.transforms import INCOMING_REWARD
from dreamer_trl.world_model import ObsSpace

ALGO_YAML = Path(__file__).resolve().parents[1] / "conf" / "algo" / "dreamerv3.yaml"
TINY = dict(deter=64, hidden=16, classes=4, units=16, depth=2, stoch=8)
OBS, ACT = 5, 2


def make_agent(algo: dict | None = None, seed: int = 0) -> DreamerV3Agent:
    """Formula tests compare against float32 arithmetic, so imagination runs in float32
    unless ``algo`` says otherwise (the bf16 path has its own tests at the end)."""
    torch.manual_seed(seed)
    algo = {"imag_dtype": "float32", **(algo or {})}
    agent = DreamerV3Agent(ObsSpace({"observation": OBS}, {}), ACT, False, TINY, algo)
    # The reward, critic (and slow critic) outputs start at zero, which would hide every
    # gradient path through them; give them the weights a trained agent would have.
    with torch.no_grad():
        for layer in (
            agent.world_model.reward.out,
            agent.critic.out,
            agent.loss.slow_critic.net.out,
        ):
            trunc_normal_(layer.weight, layer.in_features, 1.0)
    return agent


def make_batch(agent: DreamerV3Agent, b: int = 3, t1: int = 9, seed: int = 0) -> TensorDict:
    """A replay batch of steps [B, T+1] (step 0 is the context)."""
    g = torch.Generator().manual_seed(seed)
    rssm = agent.world_model.rssm
    first = torch.zeros(b, t1, dtype=torch.bool)
    first[:, 0] = True
    return TensorDict(
        {
            "observation": 2 * torch.randn(b, t1, OBS, generator=g),
            "action": 2 * torch.rand(b, t1, ACT, generator=g) - 1,
            "reward": torch.randn(b, t1, generator=g),
            "is_first": first,
            "is_last": torch.zeros(b, t1, dtype=torch.bool),
            "is_terminal": torch.zeros(b, t1, dtype=torch.bool),
            "deter": torch.zeros(b, t1, rssm.deter),
            "stoch": torch.zeros(b, t1, rssm.stoch, rssm.classes),
        },
        [b, t1],
    )


@pytest.fixture
def agent() -> DreamerV3Agent:
    return make_agent()


def _compute(agent, td, seed=0):
    torch.manual_seed(seed)
    return agent.loss.compute(agent.loss.sequence(td))


def _has_grad(module) -> bool:
    return any(p.grad is not None and p.grad.abs().max() > 0 for p in module.parameters())


def _grad_free(module) -> bool:
    return all(p.grad is None or p.grad.abs().max() == 0 for p in module.parameters())


# --------------------------------------------------------------------------- KL


def _leaf_logp(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.log_softmax(logits, -1).requires_grad_(True)


def test_kl_stop_gradients(agent):
    wm = agent.world_model
    post, prior = _leaf_logp(4, 32, 4, seed=1), _leaf_logp(4, 32, 4, seed=2)
    dyn, rep = wm.kl_losses(post, prior)
    kl = categorical_kl(post, prior).sum(-1)
    assert bool((kl > 1.0).all())  # above the free nats: nothing clipped here
    torch.testing.assert_close(dyn, kl)
    torch.testing.assert_close(rep, kl)

    dyn.sum().backward()
    assert post.grad is None  # dyn trains the prior only
    # ∂/∂log q of Σ p (log p − log q) = −p
    torch.testing.assert_close(prior.grad, -post.detach().exp())

    prior.grad = None
    _, rep = wm.kl_losses(post, prior)
    rep.sum().backward()
    assert prior.grad is None  # rep trains the posterior only
    p, lp, lq = post.detach().exp(), post.detach(), prior.detach()
    torch.testing.assert_close(post.grad, p * (lp - lq) + p)


def test_free_nats_clip_below_one(agent):
    wm = agent.world_model
    assert wm.free_nats == 1.0
    prior = _leaf_logp(3, 32, 4, seed=3)
    noise = 0.05 * torch.randn(3, 32, 4, generator=torch.Generator().manual_seed(4)).double()
    post = torch.log_softmax(prior.detach() + noise, -1).requires_grad_(True)
    kl = categorical_kl(post, prior).sum(-1)
    assert bool((kl < 1.0).all()) and bool((kl > 0).all())
    dyn, rep = wm.kl_losses(post, prior)
    assert torch.equal(dyn, torch.ones(3, dtype=torch.float64))
    assert torch.equal(rep, torch.ones(3, dtype=torch.float64))
    (dyn.sum() + rep.sum()).backward()
    assert torch.equal(post.grad, torch.zeros_like(post))
    assert torch.equal(prior.grad, torch.zeros_like(prior))


def test_free_nats_mixed_rows(agent):
    prior = _leaf_logp(2, 32, 4, seed=5)
    far = _leaf_logp(1, 32, 4, seed=6).detach()
    near = torch.log_softmax(prior.detach()[1:] + 0.01, -1)
    post = torch.cat([far, near]).requires_grad_(True)
    dyn, _ = agent.world_model.kl_losses(post, prior)
    assert dyn[0] > 1.0 and dyn[1] == 1.0
    dyn.sum().backward()
    assert prior.grad[0].abs().sum() > 0
    assert torch.equal(prior.grad[1], torch.zeros_like(prior.grad[1]))


# --------------------------------------------------------------------------- gradient routing


def test_actor_loss_does_not_reach_world_model_or_critic(agent):
    losses, *_ = _compute(agent, make_batch(agent))
    losses["policy"].mean().backward()
    assert _grad_free(agent.world_model)
    assert _grad_free(agent.critic)
    assert _has_grad(agent.actor)


def test_critic_imagined_loss_does_not_reach_world_model(agent):
    losses, *_ = _compute(agent, make_batch(agent))
    losses["value"].mean().backward()
    assert _grad_free(agent.world_model)
    assert _grad_free(agent.actor)
    assert _has_grad(agent.critic)


def test_replay_value_loss_reaches_world_model(agent):
    losses, *_ = _compute(agent, make_batch(agent))
    losses["repval"].mean().backward()
    wm = agent.world_model
    for name, param in [
        ("encoder", wm.encoder.mlp[0].linear.weight),
        ("rssm core", wm.rssm.dyngru.weight),
        ("rssm posterior", wm.rssm.post_logit.weight),
    ]:
        assert param.grad is not None and param.grad.abs().max() > 0, name
    assert _has_grad(agent.critic)
    assert _grad_free(agent.actor)
    # the heads that do not feed the critic's input stay untouched
    for head in (wm.decoder, wm.reward, wm.cont):
        assert _grad_free(head)


def test_world_model_losses_do_not_reach_actor_or_critic(agent):
    losses, *_ = _compute(agent, make_batch(agent))
    sum(losses[k].mean() for k in ("rec", "rew", "con", "dyn", "rep")).backward()
    assert _grad_free(agent.actor) and _grad_free(agent.critic)
    assert _has_grad(agent.world_model.encoder) and _has_grad(agent.world_model.rssm)


# --------------------------------------------------------------------------- continue target


def test_continue_target_formula(agent):
    wm = agent.world_model
    assert wm.horizon == 333
    target = wm.cont_target(torch.tensor([True, False, False]))
    expected = torch.tensor([0.0, 1 - 1 / 333, 1 - 1 / 333])
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)


def test_truncation_is_not_termination_in_continue_loss(agent):
    td = make_batch(agent, b=2, t1=7)
    td["is_last"][:, 3] = True  # row 0: truncated at step 3; row 1: terminated there
    td["is_terminal"][1, 3] = True
    td["is_first"][:, 4] = True
    seq = agent.loss.sequence(td)
    torch.manual_seed(0)
    losses, feat, *_ = agent.loss.wm_loss.observe(seq)
    logits = agent.world_model.cont(feat)
    target = torch.full((2, 6), 1 - 1 / 333)
    target[1, 2] = 0.0  # step 3 of the batch is index 2 of the trained steps
    torch.testing.assert_close(losses["con"], -binary_log_prob(logits, target))


# --------------------------------------------------------------------------- loss scales


def _check_scales(out, scales):
    for k, s in scales.items():
        assert out[f"loss_{k}"].item() == pytest.approx(s * out[f"raw_{k}"].item(), rel=1e-5), k


def test_default_loss_scales_applied(agent):
    assert DEFAULT_SCALES == {
        "rec": 1.0, "rew": 1.0, "con": 1.0, "dyn": 1.0, "rep": 0.1,
        "policy": 1.0, "value": 1.0, "repval": 0.3,
    }  # fmt: skip
    torch.manual_seed(0)
    out = agent.loss(make_batch(agent))
    _check_scales(out, DEFAULT_SCALES)
    for k in ("dyn", "rep", "repval"):  # non-trivial values, so the ratios mean something
        assert out[f"raw_{k}"].item() > 0.1
    expected_total = sum(out[f"loss_{k}"] for k in DEFAULT_SCALES)
    torch.testing.assert_close(total_loss(out), expected_total)


def test_config_loss_scales_applied():
    algo = yaml.safe_load(ALGO_YAML.read_text())
    assert algo["loss_scales"]["dyn"] == 1.0
    assert algo["loss_scales"]["rep"] == 0.1
    assert algo["loss_scales"]["repval"] == 0.3
    agent = make_agent(algo)
    torch.manual_seed(0)
    _check_scales(agent.loss(make_batch(agent)), algo["loss_scales"])
    custom = make_agent({"loss_scales": {"rep": 0.5, "repval": 0.0}})
    torch.manual_seed(0)
    out = custom.loss(make_batch(custom))
    _check_scales(out, {**DEFAULT_SCALES, "rep": 0.5, "repval": 0.0})


# --------------------------------------------------------------------------- return normaliser


def test_return_normalizer_hand_values():
    norm = ReturnNormalizer()
    assert norm.lo.item() == 0.0 and norm.hi.item() == 0.0
    returns = torch.linspace(0.0, 1000.0, 101)  # p5 = 50, p95 = 950
    s1 = norm(returns)
    assert norm.lo.item() == pytest.approx(0.5, rel=1e-6)  # 0.99·0 + 0.01·50
    assert norm.hi.item() == pytest.approx(9.5, rel=1e-6)
    assert s1.item() == pytest.approx(9.0, rel=1e-6)
    s2 = norm(returns)
    assert norm.lo.item() == pytest.approx(0.99 * 0.5 + 0.5, rel=1e-6)  # 0.995
    assert norm.hi.item() == pytest.approx(0.99 * 9.5 + 9.5, rel=1e-6)  # 18.905
    assert s2.item() == pytest.approx(18.905 - 0.995, rel=1e-6)
    s3 = norm(returns * 100, update=False)  # reading the scale does not move it
    assert s3.item() == pytest.approx(s2.item())


def test_return_normalizer_scale_floor_is_one(agent):
    assert agent.loss.return_norm.rate == 0.01 and agent.loss.return_norm.limit == 1.0
    norm = ReturnNormalizer()
    s = norm(torch.linspace(0.0, 100.0, 101))  # lo 0.05, hi 0.95 → 0.9 < 1
    assert norm.lo.item() == pytest.approx(0.05, rel=1e-6)
    assert norm.hi.item() == pytest.approx(0.95, rel=1e-6)
    assert s.item() == 1.0


def test_actor_loss_formula(agent):
    """−w·(log π(a)·sg((R − v)/S) + 3e-4·H[π]), averaged over the horizon."""
    torch.manual_seed(0)
    actor_loss = agent.loss.actor_loss
    n, h, e = 4, 3, agent.world_model.rssm.feat_dim
    feat = torch.randn(n, h + 1, e)
    action = torch.rand(n, h + 1, ACT) * 2 - 1
    ret, value = 5 * torch.randn(n, h), 5 * torch.randn(n, h + 1)
    weight = torch.rand(n, h + 1)
    img = Imagination(feat, action, torch.zeros(n, h + 1), weight, value, weight, ret)
    actor_loss.return_norm.lo.fill_(-2.0)
    actor_loss.return_norm.hi.fill_(2.0)  # S = 4
    loss, metrics = actor_loss.policy_terms(img, update_norm=False)
    params = agent.actor(feat[:, :-1])
    mean, std = params.chunk(2, -1)
    dist = torch.distributions.Normal(mean, std)
    logpi = dist.log_prob(action[:, :-1]).sum(-1)
    adv = (ret - value[:, :-1]) / 4.0
    expected = (weight[:, :-1] * -(logpi * adv + 3e-4 * dist.entropy().sum(-1))).mean(1)
    torch.testing.assert_close(loss, expected)
    assert metrics["return_scale"].item() == 4.0


def test_imagination_returns_and_weights(agent):
    torch.manual_seed(0)
    rssm = agent.world_model.rssm
    deter = torch.randn(6, rssm.deter)
    stoch = F.one_hot(torch.randint(0, rssm.classes, (6, rssm.stoch)), rssm.classes).float()
    img = agent.loss.actor_loss.imagine(deter, stoch)
    assert img.feat.shape == (6, 16, rssm.feat_dim)  # 15 imagined steps + the start
    assert not img.feat.requires_grad
    torch.testing.assert_close(img.feat[:, 0], torch.cat([deter, stoch.flatten(-2)], -1))
    torch.testing.assert_close(img.weight, torch.cumprod(img.cont, 1))
    torch.testing.assert_close(img.ret, lambda_return(img.reward, img.cont, img.value, 0.95))
    assert img.reward.abs().max() > 0 and img.value.abs().max() > 0


def test_replay_value_loss_formula(agent):
    td = make_batch(agent, b=2, t1=7)
    td["is_last"][0, 3] = True
    td["is_terminal"][0, 3] = True
    td["is_first"][0, 4] = True
    seq = agent.loss.sequence(td)
    critic_loss = agent.loss.critic_loss
    torch.manual_seed(0)
    feat = torch.randn(2, 6, agent.world_model.rssm.feat_dim)
    boot = 3 * torch.randn(2, 6)
    loss = critic_loss.repval_terms(feat, seq, boot)
    live = (1 - seq.is_terminal.float()) * (1 - 1 / 333)
    ret = lambda_return(seq.reward, live, boot, 0.95, last=seq.is_last)
    critic, slow = agent.critic, agent.loss.slow_critic
    logits = critic(feat[:, :-1])
    # decoded as the loss decodes it (fold order: the same value, summed in another order,
    # which moves float32 rounding at these random heads' ~1e7 scale; the two decodes are
    # pinned against each other in test_functional)
    slow_pred = slow.predict_folded(slow.folded_logits(feat[:, :-1]))
    torch.testing.assert_close(slow_pred, slow.predict(slow(feat[:, :-1])), rtol=1e-5, atol=1e-3)
    expected = critic.loss(logits, ret) + critic.loss(logits, slow_pred)
    expected = expected * (1 - seq.is_last[:, :-1].float())
    torch.testing.assert_close(loss, expected)
    assert loss[0, 2] == 0.0  # the step that ends the episode is not regressed


# --------------------------------------------------------------------------- slow critic


def test_slow_critic_ema_rate():
    torch.manual_seed(0)
    critic = Critic(10, 8, layers=1)
    slow = SlowCritic(critic, rate=0.02)
    for p, q in zip(slow.net.parameters(), critic.parameters()):
        assert torch.equal(p, q)  # starts as a copy
        assert not p.requires_grad
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in slow.net.parameters()]
    slow.update(critic)
    for p, b, c in zip(slow.net.parameters(), before, critic.parameters()):
        torch.testing.assert_close(p, 0.98 * b + 0.02 * c)


def test_slow_critic_updates_after_each_agent_update():
    agent = make_agent({"optim": {"lr": 1e-3, "warmup": 0}})
    slow = agent.loss.slow_critic
    assert slow.rate == 0.02
    before = [p.clone() for p in slow.net.parameters()]
    critic_before = [p.clone() for p in agent.critic.parameters()]
    torch.manual_seed(0)
    agent.update(make_batch(agent))
    moved = False
    for p, b, c, c0 in zip(slow.net.parameters(), before, agent.critic.parameters(), critic_before):
        torch.testing.assert_close(p, 0.98 * b + 0.02 * c)  # towards the *updated* critic
        moved |= not torch.equal(c, c0)
    assert moved


# --------------------------------------------------------------------------- episode starts


def test_first_observation_of_an_episode_is_trained_on(agent):
    td = make_batch(agent, b=2, t1=9)
    td["is_last"][:, 4] = True  # episode ends at step 4, the next one starts at step 5
    td["is_terminal"][:, 4] = True
    td["is_first"][:, 5] = True
    seq = agent.loss.sequence(td)

    def run(td):
        seq = agent.loss.sequence(td)
        torch.manual_seed(0)
        losses, *_ = agent.loss.wm_loss.observe(seq)
        tokens = agent.world_model.encoder(seq.obs)
        torch.manual_seed(0)
        _, _, post = agent.world_model.rssm.observe(
            tokens, seq.prev_action, seq.is_first, seq.deter, seq.stoch
        )
        return losses["rec"].detach(), post.detach()

    assert bool(seq.is_first[:, 4].all())  # trained step index 4 = batch step 5
    rec, post = run(td)
    changed = td.clone()
    changed["observation"][:, 5] += 3.0
    rec2, post2 = run(changed)
    assert (rec2[:, 4] - rec[:, 4]).abs().min() > 1e-3  # its reconstruction is a target
    assert (post2[:, 4] - post[:, 4]).abs().max() > 1e-3  # and it is encoded
    torch.testing.assert_close(rec2[:, :4], rec[:, :4], rtol=0, atol=0)  # causal
    torch.manual_seed(0)
    out1 = agent.loss(td)
    torch.manual_seed(0)
    out2 = agent.loss(changed)
    assert abs(out1["loss_rec"].item() - out2["loss_rec"].item()) > 1e-3


def _transitions() -> TensorDict:
    """Five TorchRL transitions of one env; episode 1 terminates at row 2, episode 2 is
    truncated at row 4. Observations are numbered: o_k = [k, -k]."""
    obs = lambda *ks: torch.tensor([[float(k), -float(k)] for k in ks])  # noqa: E731
    col = lambda *v: torch.tensor(v).unsqueeze(-1)  # noqa: E731
    return TensorDict(
        {
            "observation": obs(0, 1, 2, 4, 5),
            "action": torch.arange(5.0).unsqueeze(-1).expand(5, 2) + 0.5,
            "is_init": col(True, False, False, True, False),
            INCOMING_REWARD: col(0.0, 1.0, 2.0, 0.0, 4.0),
            "next": {
                "observation": obs(1, 2, 3, 5, 6),
                "reward": col(1.0, 2.0, 3.0, 4.0, 5.0),
                "done": col(False, False, True, False, True),
                "terminated": col(False, False, True, False, False),
                "truncated": col(False, False, False, False, True),
                "deter": torch.arange(5.0).unsqueeze(-1).expand(5, 3) + 10,
                "stoch": torch.ones(5, 2, 2),
            },
        },
        [5],
    )


def test_transitions_to_steps_layout():
    steps = transitions_to_steps(_transitions(), ["observation"])
    assert steps.shape == (7,)
    assert steps["observation"][:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert steps["is_first"].tolist() == [True, False, False, False, True, False, False]
    assert steps["is_last"].tolist() == [False, False, False, True, False, False, True]
    # termination at row 2; the truncation at row 4 is NOT termination
    assert steps["is_terminal"].tolist() == [False, False, False, True, False, False, False]
    assert steps["reward"].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0]
    assert steps["action"][:, 0].tolist() == [0.5, 1.5, 2.5, 0.0, 3.5, 4.5, 0.0]
    # latents: each root step gets the policy's posterior; final steps get zeros
    assert steps["deter"][:, 0].tolist() == [10, 11, 12, 0, 13, 14, 0]
    assert steps["stoch"].sum((-2, -1)).tolist() == [4, 4, 4, 0, 4, 4, 0]


def test_transitions_to_steps_batched_envs():
    td = torch.stack([_transitions(), _transitions()[[0, 1, 2, 3, 4]]])
    td["next", "done"][1] = False  # the second env never ends an episode here
    td["next", "terminated"][1] = False
    td["next", "truncated"][1] = False
    steps = transitions_to_steps(td, ["observation"])
    assert steps.shape == (12,)
    assert steps["observation"][:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 4, 5]
    assert steps["is_last"].sum().item() == 2


def test_steps_become_sequences():
    steps = transitions_to_steps(_transitions(), ["observation"])
    batch = torch.stack([steps[:5], steps[2:]])  # [B=2, T+1=5]
    seq = sequence_from_steps(batch, ["observation"])
    assert seq.obs["observation"].shape == (2, 4, 2)
    assert seq.obs["observation"][0, :, 0].tolist() == [1, 2, 3, 4]
    # prev_action of each trained step is the action taken at the step before it
    assert seq.prev_action[0, :, 0].tolist() == [0.5, 1.5, 2.5, 0.0]
    assert seq.reward[0].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert seq.is_first[0].tolist() == [False, False, False, True]
    assert seq.is_terminal[0].tolist() == [False, False, True, False]
    # the context is step 0's stored latent
    assert seq.deter[0, 0].item() == 10 and seq.deter[1, 0].item() == 12


def test_dynamics_backprop_actor_trains_the_actor_only():
    """paper2023 continuous actor: the return's gradient reaches the actor through the
    dynamics, and neither world-model nor critic parameters get any of it."""
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.world_model import ObsSpace

    torch.manual_seed(0)
    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(
        ObsSpace({"observation": OBS}, {}),
        ACT,
        False,
        model,
        {"actor_grad": "auto", "loss_scales": {"repval": 0.0}},
    )
    assert agent.loss.actor_loss.actor_grad == "dynamics"
    for head in (agent.world_model.reward.out, agent.critic.out):  # zero-init blocks grads
        torch.nn.init.normal_(head.weight, std=0.1)
    rssm = agent.world_model.rssm
    deter = torch.randn(8, rssm.deter)
    stoch = F.one_hot(torch.randint(0, rssm.classes, (8, rssm.stoch)), rssm.classes).float()
    img = agent.loss.actor_loss.rollout(deter, stoch)
    assert img.feat.requires_grad and img.ret.requires_grad
    loss, _ = agent.loss.actor_loss.policy_terms(img)
    loss.mean().backward()
    assert _has_grad(agent.actor)
    assert _grad_free(agent.world_model) and _grad_free(agent.critic)
    assert all(p.requires_grad for p in agent.world_model.parameters())  # unfrozen after


def test_dynamics_backprop_rejects_discrete_actions():
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.world_model import ObsSpace

    model = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    with pytest.raises(ValueError, match="continuous"):
        DreamerV3Agent(
            ObsSpace({"observation": OBS}, {}), 3, True, model, {"actor_grad": "dynamics"}
        )
    agent = DreamerV3Agent(
        ObsSpace({"observation": OBS}, {}), 3, True, model, {"actor_grad": "auto"}
    )
    assert agent.loss.actor_loss.actor_grad == "reinforce"


def test_return_normalizer_loads_checkpoints_of_the_earlier_layout():
    """Runs started before the switch to PercentileValueNorm stored lo/hi/quantiles."""
    norm = ReturnNormalizer()
    old = {
        "lo": torch.tensor(-2.0),
        "hi": torch.tensor(3.0),
        "quantiles": torch.tensor([0.05, 0.95]),
    }
    norm.load_state_dict(old)
    assert norm.lo.item() == -2.0 and norm.hi.item() == 3.0
    assert norm(torch.zeros(4), update=False).item() == 5.0


# --------------------------------------------------------------------------- bf16 rollout


def test_bfloat16_imagination_tracks_float32_and_stays_out_of_the_state():
    exact, low = make_agent(), make_agent({"imag_dtype": "bfloat16"})
    keys = set(exact.state_dict())
    assert set(low.state_dict()) == keys  # the bf16 copies are not part of the agent
    assert len(list(low.parameters())) == len(list(exact.parameters()))
    seq = exact.loss.sequence(make_batch(exact))
    _, _, deter, stoch, _ = exact.loss.wm_loss.observe(seq)
    d, s = deter.flatten(0, 1), stoch.flatten(0, 1)
    torch.manual_seed(0)
    img32 = exact.loss.actor_loss.imagine(d, s)
    torch.manual_seed(0)
    img16 = low.loss.actor_loss.imagine(d, s)
    assert img16.feat.dtype == torch.bfloat16 and img16.action.dtype == torch.float32
    # Same start, same uniforms: the first imagined deter differs by bf16 rounding only.
    d16, d32 = img16.feat[:, 1, :64].float(), img32.feat[:, 1, :64]
    torch.testing.assert_close(d16, d32, atol=0.03, rtol=0)
    assert (d16 - d32).abs().max() > 0  # really computed in bf16
    # Heads on the start states (same inputs; only the compute differs — later states
    # depend on samples, which bf16 rounding can flip): on average within 2 % (this test's
    # untrained heads predict values of order 1e6 from spread-out logits).
    for name in ("reward", "cont", "value"):
        a, b = getattr(img16, name)[:, 0], getattr(img32, name)[:, 0]
        assert a.dtype == torch.float32
        assert (a - b).abs().mean() < 0.02 * b.abs().mean(), name
    # The copies follow the trained weights: change one, the next rollout sees it.
    with torch.no_grad():
        low.actor.out.bias.add_(5.0)
    low.loss.actor_loss.imagine(d, s)
    shadow_actor = low.loss.actor_loss.precision.copy_of(low.actor)
    assert shadow_actor is not low.actor and shadow_actor.out.bias.dtype == torch.bfloat16
    torch.testing.assert_close(shadow_actor.out.bias.float(), low.actor.out.bias, atol=0.05, rtol=0)


def test_bfloat16_imagination_update_trains_every_module_in_float32():
    agent = make_agent({"imag_dtype": "bfloat16", "optim": {"warmup": 0}})
    agent.optimizer.zero_grad()
    out = agent.loss(make_batch(agent))
    assert all(torch.isfinite(out[f"loss_{k}"]) for k in DEFAULT_SCALES)
    total_loss(out).backward()
    for module in (agent.actor, agent.critic, agent.world_model):
        assert _has_grad(module)
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in module.parameters())


def test_unknown_imag_dtype_rejected():
    with pytest.raises(ValueError, match="imag_dtype 'float16' unknown; valid: float32, bfloat16"):
        make_agent({"imag_dtype": "float16"})


def test_auto_imag_dtype_follows_the_device_bf16_units():
    """auto picks bf16 only where the hardware has it: emulated bf16 was 6x slower (CPU)."""
    from dreamer_trl.precision import native_bf16, resolve_dtype

    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert native_bf16("cpu") == (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
