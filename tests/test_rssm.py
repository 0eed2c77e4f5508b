"""RSSM: resets at is_first, the block-GRU core against a hand re-implementation, action
scaling, imagination without a graph, unimixed prior/posterior (SPEC.md: RSSM core)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreamer_trl.rssm import RSSM

DETER, HIDDEN, STOCH, CLASSES, BLOCKS, ACT, TOK = 16, 8, 4, 3, 4, 2, 5


@pytest.fixture
def rssm() -> RSSM:
    torch.manual_seed(0)
    model = RSSM(
        ACT, TOK, deter=DETER, hidden=HIDDEN, stoch=STOCH, classes=CLASSES, blocks=BLOCKS
    ).double()
    # non-trivial norm scales and biases, so a layout mistake cannot hide behind zeros/ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _random_state(n: int):
    deter = torch.randn(n, DETER, dtype=torch.float64)
    stoch = F.one_hot(torch.randint(0, CLASSES, (n, STOCH)), CLASSES).double()
    return deter, stoch


# --------------------------------------------------------------------------- resets


def test_is_first_zeroes_deter_stoch_and_action(rssm):
    torch.manual_seed(1)
    n = 3
    tokens = torch.randn(n, 1, TOK, dtype=torch.float64)
    deter, stoch = _random_state(n)
    action = 2 * torch.randn(n, 1, ACT, dtype=torch.float64)
    first = torch.ones(n, 1, dtype=torch.bool)
    d1, _, post1 = rssm.observe(tokens, action, first, deter, stoch)
    zd, zs = torch.zeros_like(deter), torch.zeros_like(stoch)
    d0, _, post0 = rssm.observe(tokens, torch.zeros_like(action), ~first, zd, zs)
    torch.testing.assert_close(d1, d0, rtol=0, atol=0)
    torch.testing.assert_close(post1, post0, rtol=0, atol=0)
    # without the reset flag the carried state matters
    d2, _, _ = rssm.observe(tokens, action, ~first, deter, stoch)
    assert (d2 - d0).abs().max() > 1e-3
    # each of deter, stoch and action alone changes the step, so all three must be masked
    for args in (
        (torch.zeros_like(action), deter, zs),
        (torch.zeros_like(action), zd, stoch),
        (action, zd, zs),
    ):
        d3, _, _ = rssm.observe(tokens, args[0], ~first, args[1], args[2])
        assert (d3 - d0).abs().max() > 1e-4


def test_is_first_mid_sequence_resets(rssm):
    torch.manual_seed(2)
    n, t = 2, 5
    tokens = torch.randn(n, t, TOK, dtype=torch.float64)
    action = torch.randn(n, t, ACT, dtype=torch.float64)
    first = torch.zeros(n, t, dtype=torch.bool)
    first[:, 3] = True
    deter, stoch = _random_state(n)
    d, s, post = rssm.observe(tokens, action, first, deter, stoch)
    assert d.shape == (n, t, DETER) and s.shape == (n, t, STOCH, CLASSES)
    assert post.shape == (n, t, STOCH, CLASSES)
    zd, zs = rssm.initial(n)
    fresh, _, fresh_post = rssm.observe(
        tokens[:, 3:4], torch.zeros_like(action[:, 3:4]), first[:, 3:4], zd.double(), zs.double()
    )
    torch.testing.assert_close(d[:, 3], fresh[:, 0], rtol=0, atol=0)
    # The posterior's token half is one matmul over all T steps, so here a [n·T, F] and an
    # [n, F] product, which the BLAS may round differently in the last bit (seen once, 4e-16,
    # in a clean-clone run beside two training jobs). A missed reset moves it by > 1e-4.
    torch.testing.assert_close(post[:, 3], fresh_post[:, 0], rtol=0, atol=1e-12)


def test_obs_step_equals_one_observe_step(rssm):
    torch.manual_seed(3)
    deter, stoch = _random_state(2)
    token, action = torch.randn(2, TOK).double(), torch.randn(2, ACT).double()
    first = torch.tensor([True, False])
    d, s, post = rssm.obs_step(deter, stoch, action, token, first)
    d2, _, post2 = rssm.observe(token[:, None], action[:, None], first[:, None], deter, stoch)
    torch.testing.assert_close(d, d2[:, 0])
    torch.testing.assert_close(post, post2[:, 0])
    assert s.shape == (2, STOCH, CLASSES)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_observe_in_chunks_equals_one_pass(rssm, chunk):
    """compile.observe_chunk: filtering K steps per call (the last chunk shorter) gives the
    same states, samples and gradients as one pass over the sequence."""
    b, t = 2, 7
    tokens = torch.randn(b, t, TOK, dtype=torch.float64, requires_grad=True)
    action = torch.randn(b, t, ACT, dtype=torch.float64)
    first = torch.zeros(b, t, dtype=torch.bool)
    first[0, 3] = True  # a reset inside a chunk
    deter, stoch = _random_state(b)

    def run(k):
        torch.manual_seed(5)
        out = rssm.observe(tokens, action, first, deter, stoch, chunk=k)
        (grad,) = torch.autograd.grad(out[0].sum() + out[2].square().sum(), tokens)
        return out, grad

    (d1, s1, p1), g1 = run(None)
    (dk, sk, pk), gk = run(chunk)
    assert dk.shape == (b, t, DETER) and sk.shape == (b, t, STOCH, CLASSES)
    torch.testing.assert_close(dk, d1)
    torch.testing.assert_close(sk, s1)
    torch.testing.assert_close(pk, p1)
    torch.testing.assert_close(gk, g1)


# --------------------------------------------------------------------------- the core


def _rms(x, weight, eps=1e-4):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _hidden(layer, x):
    h = x @ layer.linear.weight.T + layer.linear.bias
    return F.silu(_rms(h, layer.norm.weight))


def _hand_core(m: RSSM, deter, stoch, action):
    """Block GRU written out per block, following the SPEC.md formula."""
    g, d = m.blocks, m.deter
    action = action / torch.clamp(action.abs(), min=1.0)
    x0 = _hidden(m.dynin0, deter)
    x1 = _hidden(m.dynin1, stoch.flatten(-2))
    x2 = _hidden(m.dynin2, action)
    shared = torch.cat([x0, x1, x2], -1)
    hid = []
    for b in range(g):
        inp = torch.cat([deter[:, b * d // g : (b + 1) * d // g], shared], -1)
        hid.append(inp @ m.dynhid.weight[b])
    hid = torch.cat(hid, -1) + m.dynhid.bias
    hid = F.silu(_rms(hid, m.dynhid_norm.weight))
    resets, cands, updates = [], [], []
    for b in range(g):
        out = hid[:, b * d // g : (b + 1) * d // g] @ m.dyngru.weight[b]
        out = out + m.dyngru.bias[b * 3 * d // g : (b + 1) * 3 * d // g]
        r, c, u = out.chunk(3, -1)  # each block's output split into its three gates
        resets.append(r)
        cands.append(c)
        updates.append(u)
    reset, cand, update = (torch.cat(v, -1) for v in (resets, cands, updates))
    update = torch.sigmoid(update - 1.0)
    cand = torch.tanh(torch.sigmoid(reset) * cand)
    return update * cand + (1.0 - update) * deter


def test_core_matches_hand_block_gru(rssm):
    torch.manual_seed(4)
    deter, stoch = _random_state(3)
    action = 3 * torch.randn(3, ACT, dtype=torch.float64)
    out = rssm.core(deter, stoch, rssm.embed_action(action))
    torch.testing.assert_close(out, _hand_core(rssm, deter, stoch, action), rtol=1e-10, atol=1e-10)
    d2, prior = rssm.img_step(deter, stoch, action)
    torch.testing.assert_close(d2, out)
    torch.testing.assert_close(prior, rssm.prior(out))


def test_action_scaled_by_max_one_abs(rssm):
    action = torch.tensor([[0.5, -2.0], [3.0, 0.25]], dtype=torch.float64)
    scaled = torch.tensor([[0.5, -1.0], [1.0, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(rssm.embed_action(action), rssm.dynin2(scaled), rtol=0, atol=0)
    # the divisor is stop-gradient: ∂(a / sg(max(1, |a|)))/∂a = 1 / max(1, |a|) (not clamp's 0)
    action.requires_grad_(True)
    scaled.requires_grad_(True)
    weights = torch.randn(2, HIDDEN, dtype=torch.float64)
    (rssm.embed_action(action) * weights).sum().backward()
    (rssm.dynin2(scaled) * weights).sum().backward()
    divisor = action.detach().abs().clamp(min=1.0)
    torch.testing.assert_close(action.grad, scaled.grad / divisor)


def test_initial_state_is_zero(rssm):
    deter, stoch = rssm.initial(4)
    assert torch.equal(deter, torch.zeros(4, DETER))
    assert torch.equal(stoch, torch.zeros(4, STOCH, CLASSES))


# --------------------------------------------------------------------------- imagination


def test_imagine_has_no_graph(rssm):
    torch.manual_seed(5)
    deter, stoch = _random_state(6)
    deter.requires_grad_(True)
    policy_net = torch.nn.Linear(rssm.feat_dim, ACT).double()
    grad_modes = []

    def policy(feat):
        grad_modes.append(torch.is_grad_enabled())
        return torch.tanh(policy_net(feat))

    deters, stochs, actions = rssm.imagine(deter, stoch, policy, horizon=4)
    assert deters.shape == (6, 5, DETER)
    assert stochs.shape == (6, 5, STOCH, CLASSES)
    assert actions.shape == (6, 5, ACT)
    for x in (deters, stochs, actions):
        assert not x.requires_grad and x.grad_fn is None
    assert grad_modes == [False] * 5  # H steps plus the action at the last state
    torch.testing.assert_close(deters[:, 0], deter.detach())
    torch.testing.assert_close(stochs[:, 0], stoch)
    # each step follows the core with the action taken at the previous state
    torch.testing.assert_close(
        deters[:, 1], rssm.core(deters[:, 0], stochs[:, 0], rssm.embed_action(actions[:, 0]))
    )
    # stoch samples are one-hot
    assert torch.equal(stochs[:, 1:].sum(-1), torch.ones(6, 4, STOCH, dtype=torch.float64))


# --------------------------------------------------------------------------- prior / posterior


def test_prior_and_post_are_unimixed_log_probs(rssm):
    torch.manual_seed(6)
    with torch.no_grad():  # near-deterministic logits: probabilities hit the unimix floor
        rssm.prior_logit.weight.mul_(1e4)
        rssm.post_logit.weight.mul_(1e4)
    deter, stoch = _random_state(5)
    prior = rssm.prior(deter)
    _, _, post = rssm.observe(
        torch.randn(5, 1, TOK).double(),
        torch.zeros(5, 1, ACT).double(),
        torch.zeros(5, 1, dtype=torch.bool),
        deter,
        stoch,
    )
    floor, top = 0.01 / CLASSES, 0.99 + 0.01 / CLASSES
    for logp in (prior, post[:, 0]):
        assert logp.shape == (5, STOCH, CLASSES)
        probs = logp.exp()
        torch.testing.assert_close(probs.sum(-1), torch.ones(5, STOCH, dtype=torch.float64))
        torch.testing.assert_close(probs.min(-1).values, torch.full((5, STOCH), floor).double())
        torch.testing.assert_close(probs.max(-1).values, torch.full((5, STOCH), top).double())


def test_posterior_reads_deter_and_tokens(rssm):
    """post = logits(silu(norm(W [deter, tokens] + b))) of one hidden layer."""
    torch.manual_seed(7)
    deter, stoch = _random_state(3)
    token = torch.randn(3, TOK).double()
    action = torch.randn(3, ACT).double()
    first = torch.zeros(3, dtype=torch.bool)
    d, _, post = rssm.obs_step(deter, stoch, action, token, first)
    h = _hidden(rssm.post_net[0], torch.cat([d, token], -1))
    logits = (h @ rssm.post_logit.weight.T + rssm.post_logit.bias).unflatten(-1, (STOCH, CLASSES))
    probs = 0.99 * torch.softmax(logits, -1) + 0.01 / CLASSES
    torch.testing.assert_close(post, probs.log())


def test_classes_first_prior_is_the_prior_transposed(rssm):
    deter, _ = _random_state(7)
    logits = rssm.prior_logit(rssm.prior_net(deter)).unflatten(-1, (STOCH, CLASSES))
    torch.testing.assert_close(
        rssm.prior_logits_classes_first(deter), logits.transpose(-1, -2), rtol=0, atol=1e-12
    )


def test_img_sample_draws_what_sampling_the_prior_draws(rssm):
    from dreamer_trl.distributions import sample_probs

    deter, stoch = _random_state(300)
    action = torch.randn(300, ACT, dtype=torch.float64)
    w = rssm.shared_weight()
    torch.manual_seed(11)
    new_deter, sample = rssm.img_sample(deter, stoch, action, w)
    torch.manual_seed(11)
    expected = sample_probs(rssm.prior(new_deter).exp())
    torch.testing.assert_close(new_deter, rssm.core(deter, stoch, rssm.embed_action(action), w))
    assert torch.equal(sample, expected)
    # not a constant: the samples cover every class
    assert (sample.sum((0, 1)) > 0).all()
