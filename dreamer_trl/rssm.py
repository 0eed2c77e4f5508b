"""Recurrent state-space model with the reference's block-GRU core.

State: ``deter`` h [.., D] and ``stoch`` z [.., S, C] (S categoricals of C classes,
one-hot). ``prior`` p(z | h) and ``post`` q(z | h, x) are logits [.., S, C] already mixed
with ``unimix`` uniform (so they are log-probabilities). Shapes: B batch, T time,
D deter, S stoch, C classes, A action dims, F token features, G blocks.

The 2023 code's RSSM is two options: ``gru="plain"`` (one dense GRU, see :meth:`RSSM.core`)
and ``initial="learned"`` (the state at ``is_first`` is learned, see :meth:`RSSM.restart`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .distributions import (
    mode_onehot,
    sample_onehot_st,
    sample_unimix_classes_first,
    unimix_logits,
    unimix_probs,
)
from .nets import (
    BlockLinear,
    HiddenLayer,
    Linear,
    Norm,
    block_matmul,
    hidden_spec,
    make_norm,
    tanh,
)

GRUS = ("block", "plain")
INITIALS = ("zeros", "learned")


class RSSM(nn.Module):
    def __init__(
        self,
        action_dim: int,
        token_dim: int,
        deter: int = 512,
        hidden: int = 64,
        stoch: int = 32,
        classes: int = 4,
        blocks: int = 8,
        unimix: float = 0.01,
        norm: Norm = "rms",
        imglayers: int = 2,
        obslayers: int = 1,
        gru: str = "block",
        initial: str = "zeros",
    ):
        super().__init__()
        if gru not in GRUS or initial not in INITIALS:
            raise ValueError(
                f"gru={gru!r}, initial={initial!r}; valid: gru in {GRUS}, initial in {INITIALS}"
            )
        if gru == "block" and deter % blocks:
            raise ValueError(f"deter={deter} must be divisible by blocks={blocks}")
        self.deter, self.stoch, self.classes, self.blocks = deter, stoch, classes, blocks
        self.unimix = unimix
        # Python flags, not tensors: each path is fixed at construction, so the
        # reference's steps run exactly the ops they ran before these options existed.
        self.plain, self.learned_initial = gru == "plain", initial == "learned"
        if self.plain:
            self._build_plain_gru(action_dim, hidden, norm)
        else:
            # Core: deter, stoch and action each get their own layer; the concatenation
            # is copied to every block beside that block's slice of deter.
            self.dynin0 = HiddenLayer(deter, hidden, norm)
            self.dynin1 = HiddenLayer(stoch * classes, hidden, norm)
            self.dynin2 = HiddenLayer(action_dim, hidden, norm)
            self.dynhid = BlockLinear(deter + 3 * hidden * blocks, deter, blocks)
            self.dynhid_norm = make_norm(norm, deter)
            self.dyngru = BlockLinear(deter, 3 * deter, blocks)
        # Prior from deter alone; posterior from [deter, tokens].
        sizes = [deter] + [hidden] * imglayers
        self.prior_net = nn.Sequential(
            *[HiddenLayer(a, b, norm) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.prior_logit = Linear(hidden, stoch * classes)
        sizes = [deter + token_dim] + [hidden] * obslayers
        self.post_net = nn.ModuleList(
            HiddenLayer(a, b, norm) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.post_logit = Linear(hidden, stoch * classes)
        if self.learned_initial:
            # tanh(0) = 0: training starts from the zero deter of the reference.
            self.initial_deter = nn.Parameter(torch.zeros(deter))

    def _build_plain_gru(self, action_dim: int, hidden: int, norm: Norm) -> None:
        """The 2023 code's core: one layer on [z, a], then one dense GRU layer on [h, x]
        whose 3·D outputs (no bias where the spec has none, one norm over all three
        gates) are the reset, candidate and update gates."""
        d, spec = self.deter, hidden_spec(norm)
        self.img_in = HiddenLayer(self.stoch * self.classes + action_dim, hidden, norm)
        self.gru = Linear(d + hidden, 3 * d, bias=spec.bias)
        self.gru.hidden = True
        self.gru_norm = make_norm(spec, 3 * d)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device=None) -> tuple[Tensor, Tensor]:
        """Start state: deter [B, D], stoch [B, S, C]: zeros, or the learned one (no
        gradient: it is what a stream stores before its first step, which restarts)."""
        if self.learned_initial:
            with torch.no_grad():
                deter, stoch = self.learned_start()
            return deter.expand(batch, -1).clone(), stoch.expand(batch, -1, -1).clone()
        deter = torch.zeros(batch, self.deter, device=device)
        return deter, torch.zeros(batch, self.stoch, self.classes, device=device)

    def learned_start(self) -> tuple[Tensor, Tensor]:
        """The 2023 code's learned initial state, [1, D] and [1, S, C]: deter =
        tanh(parameter), stoch = the prior's mode there (one-hot argmax, no gradient)."""
        deter = torch.tanh(self.initial_deter).unsqueeze(0)
        logits = self.prior_logit(self.prior_net(deter)).unflatten(-1, (self.stoch, self.classes))
        return deter, mode_onehot(logits).detach()

    def restart(self, deter: Tensor, stoch: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The state a step starts from: the carried one where ``keep`` [B, 1] is 1, the
        start state where it is 0 (``is_first``): zeros, or the learned one."""
        if not self.learned_initial:
            return deter * keep, stoch * keep.unsqueeze(-1)
        d0, s0 = self.learned_start()
        first = 1.0 - keep
        return deter * keep + first * d0, stoch * keep.unsqueeze(-1) + first.unsqueeze(-1) * s0

    def shared_weight(self) -> Tensor:
        """Block GRU: x's share of every dynhid block as one dense [3·hidden, D] matrix.
        Plain GRU: stoch's share of ``img_in`` [hidden, S·C]. A copy of the weight: loops
        build it once per rollout and pass it to :meth:`core`."""
        if self.plain:
            return self.img_in.linear.weight[:, : self.stoch * self.classes].contiguous()
        k = self.deter // self.blocks
        w = self.dynhid.weight[:, k:, :]
        return w.transpose(0, 1).reshape(w.shape[1], self.deter)

    def core(
        self, deter: Tensor, stoch: Tensor, act_emb: Tensor, w_shared: Tensor | None = None
    ) -> Tensor:
        """Block-GRU step h' = f(h, z, a), with ``act_emb`` = dynin2(a) precomputed.

        Block g of ``dynhid`` sees [deter slice g, x] where x = [dynin0(h), dynin1(z),
        act_emb] is shared by all blocks, so x's share of every block is one dense
        matmul and only deter's share is block-diagonal. Each block of ``dyngru`` emits
        its slice of the reset, candidate and update gates. ``gru="plain"``: see
        :meth:`plain_core`.
        """
        if self.plain:
            return self.plain_core(deter, stoch, act_emb, w_shared)
        n, g = deter.shape[0], self.blocks
        k = self.deter // g
        x = torch.cat([self.dynin0(deter), self.dynin1(stoch.flatten(-2)), act_emb], -1)
        w = self.dynhid.weight  # [G, k + 3·hidden, k]
        shared = x @ (self.shared_weight() if w_shared is None else w_shared)
        x = block_matmul(deter, w[:, :k, :], self.dynhid.bias, base=shared)
        x = nn.functional.silu(self.dynhid_norm(x))
        gates = self.dyngru(x).view(n, g, 3, k)
        reset, cand, update = gates[:, :, 0], gates[:, :, 1], gates[:, :, 2]
        cand = tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        deter = deter.view(n, g, k)
        return (update * cand + (1.0 - update) * deter).view(n, self.deter)

    def plain_core(
        self, deter: Tensor, stoch: Tensor, act_emb: Tensor, w_shared: Tensor | None = None
    ) -> Tensor:
        """The 2023 code's GRU step, ``act_emb`` = a's share of ``img_in`` (pre-norm):

        x = SiLU(norm(W_in·[z, a] + b)); [r, c, u] = norm(W·[h, x] + b) split in thirds;
        c = tanh(σ(r)·c); u = σ(u − 1); h' = u·c + (1 − u)·h.
        """
        w = self.shared_weight() if w_shared is None else w_shared
        layer = self.img_in
        x = nn.functional.linear(stoch.flatten(-2), w, layer.linear.bias) + act_emb
        x = nn.functional.silu(layer.norm(x))
        gates = self.gru_norm(self.gru(torch.cat([deter, x], -1)))
        reset, cand, update = gates.chunk(3, -1)
        cand = tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * deter

    def embed_action(self, action: Tensor) -> Tensor:
        """dynin2(a / max(1, |a|)): large actions are squashed to magnitude ≤ 1. Plain
        GRU: the action's share of ``img_in``'s matmul (its norm needs z's share too)."""
        action = action / action.detach().abs().clamp(min=1.0)
        if self.plain:
            w = self.img_in.linear.weight[:, self.stoch * self.classes :]
            return nn.functional.linear(action, w)
        return self.dynin2(action)

    def prior(self, deter: Tensor) -> Tensor:
        """Prior logits [.., S, C] (log-probs, unimixed) from deter [.., D]."""
        return torch.log(self.prior_probs(deter))

    def prior_probs(self, deter: Tensor) -> Tensor:
        """Prior probabilities [.., S, C] (unimixed): what imagination samples from."""
        logits = self.prior_logit(self.prior_net(deter))
        return unimix_probs(logits.unflatten(-1, (self.stoch, self.classes)), self.unimix)

    def prior_logits_classes_first(self, deter: Tensor) -> Tensor:
        """Prior logits [.., C, S] (raw, before unimix): ``prior_logit``'s output rows
        reordered class-major, so each class's S logits are one contiguous slice."""
        out, s, c = self.prior_logit, self.stoch, self.classes
        weight = out.weight.view(s, c, -1).transpose(0, 1).reshape(c * s, -1)
        bias = out.bias.view(s, c).t().reshape(c * s)
        x = nn.functional.linear(self.prior_net(deter), weight, bias)
        return x.unflatten(-1, (c, s))

    def _post_from_parts(self, deter: Tensor, token_part: Tensor) -> Tensor:
        """Posterior logits from deter and the token half of the first layer's matmul."""
        first = self.post_net[0]
        w = first.linear.weight[:, : self.deter]
        x = nn.functional.silu(first.norm(nn.functional.linear(deter, w) + token_part))
        for layer in self.post_net[1:]:
            x = layer(x)
        logits = self.post_logit(x).unflatten(-1, (self.stoch, self.classes))
        return unimix_logits(logits, self.unimix)

    def _token_part(self, tokens: Tensor) -> Tensor:
        """Token half of the posterior's first layer (bias included), for all steps at once."""
        first = self.post_net[0].linear
        return nn.functional.linear(tokens, first.weight[:, self.deter :], first.bias)

    def observe(
        self,
        tokens: Tensor,
        prev_action: Tensor,
        is_first: Tensor,
        deter: Tensor,
        stoch: Tensor,
        steps: Callable | None = None,
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Filter a sequence: tokens [B, T, F], prev_action [B, T, A], is_first [B, T].

        At ``is_first`` the incoming deter, stoch and previous action are zeroed.
        Returns deter [B, T, D], stoch [B, T, S, C] (one-hot samples, straight-through
        gradients) and post logits [B, T, S, C]. ``steps`` replaces :func:`observe_steps`
        (e.g. its ``torch.compile``-d version) and runs on ``chunk`` steps at a time
        (default: all T at once).
        """
        steps = steps or observe_steps
        keep = (~is_first).to(tokens.dtype).unsqueeze(-1)
        act_emb = self.embed_action(prev_action * keep)
        token_part = self._token_part(tokens)
        w_shared = self.shared_weight()
        t_all = tokens.shape[1]
        chunk = chunk or t_all
        outs = []
        for t in range(0, t_all, chunk):
            part = slice(t, t + chunk)
            out = steps(
                self, deter, stoch, keep[:, part], act_emb[:, part], token_part[:, part], w_shared
            )
            deter, stoch = out[0][:, -1], out[1][:, -1]
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        return tuple(torch.cat(parts, 1) for parts in zip(*outs))

    def obs_step(
        self, deter: Tensor, stoch: Tensor, prev_action: Tensor, token: Tensor, is_first: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One filtering step for acting, [B, ...] in: (deter, stoch sample, post logits).

        Same computation as one step of :meth:`observe`, without its sequence plumbing.
        """
        keep = (~is_first).to(token.dtype).unsqueeze(-1)
        act_emb = self.embed_action(prev_action * keep)
        token_part = self._token_part(token)
        return observe_step(self, deter, stoch, keep, act_emb, token_part, self.shared_weight())

    def img_step(
        self, deter: Tensor, stoch: Tensor, action: Tensor, w_shared: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One prior step: (deter', prior logits)."""
        deter = self.core(deter, stoch, self.embed_action(action), w_shared)
        return deter, self.prior(deter)

    def img_sample(self, deter: Tensor, stoch: Tensor, action: Tensor, w_shared: Tensor):
        """:meth:`img_step` returning (deter', one-hot prior sample), without the logs."""
        deter = self.core(deter, stoch, self.embed_action(action), w_shared)
        logits = self.prior_logits_classes_first(deter)
        return deter, sample_unimix_classes_first(logits, self.unimix)

    def imagine(
        self,
        deter: Tensor,
        stoch: Tensor,
        policy: Callable[[Tensor], Tensor],
        horizon: int,
        final_action: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Roll the prior forward ``horizon`` steps from N start states, acting with
        ``policy(feat) -> action``. The dynamics run without autograd: imagined features
        are stop-gradient in the reference (ac_grads False), so no graph is needed.

        Returns deter [N, H+1, D], stoch [N, H+1, S, C] (index 0 = start) and the
        actions taken at those states, [N, H+1, A] — or [N, H, A] without
        ``final_action`` (the reference samples one at the last state too, though no
        step follows it and no loss reads it).
        """
        feat, actions = self.imagine_feat(deter, stoch, policy, horizon, final_action)
        stochs = feat[..., self.deter :].unflatten(-1, (self.stoch, self.classes))
        return feat[..., : self.deter], stochs, actions

    def imagine_feat(
        self,
        deter: Tensor,
        stoch: Tensor,
        policy: Callable[[Tensor], Tensor],
        horizon: int,
        final_action: bool = True,
        step: Callable | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`imagine` returning the features [N, H+1, E] = [deter, flat stoch].

        Each step writes into one preallocated buffer, which the heads then read, so the
        rollout is never stacked or concatenated afterwards. ``step(rssm, policy, feat_t,
        deter, stoch, w_shared) -> (action, deter', stoch')`` replaces :func:`rollout_step`
        (e.g. its ``torch.compile``-d version).
        """
        n, d = deter.shape[0], self.deter
        step = step or rollout_step
        with torch.no_grad():
            feat = deter.new_empty(n, horizon + 1, self.feat_dim)
            feat[:, 0, :d] = deter
            feat[:, 0, d:] = stoch.flatten(-2)
            actions, w_shared = [], self.shared_weight()
            for t in range(horizon):
                action, deter, stoch = step(self, policy, feat[:, t], deter, stoch, w_shared)
                feat[:, t + 1, :d] = deter
                feat[:, t + 1, d:] = stoch.flatten(-2)
                actions.append(action)
            if final_action:
                actions.append(policy(feat[:, horizon]))
            return feat, torch.stack(actions, 1)


def observe_step(
    rssm: RSSM,
    deter: Tensor,
    stoch: Tensor,
    keep: Tensor,
    act_emb: Tensor,
    token_part: Tensor,
    w_shared: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One filtering step of :meth:`RSSM.observe`; ``keep`` [B, 1] is 0 at episode starts."""
    deter = rssm.core(*rssm.restart(deter, stoch, keep), act_emb, w_shared)
    post = rssm._post_from_parts(deter, token_part)
    return deter, sample_onehot_st(post), post


def observe_steps(
    rssm: RSSM,
    deter: Tensor,
    stoch: Tensor,
    keep: Tensor,
    act_emb: Tensor,
    token_part: Tensor,
    w_shared: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`observe_step` over the K steps of ``keep`` [B, K, 1], ``act_emb`` [B, K, H] and
    ``token_part`` [B, K, H], stacked: deter [B, K, D], stoch and post [B, K, S, C]. Compiled
    whole, a chunk of steps is one graph forward and one backward (fewer calls per step)."""
    deters, stochs, posts = [], [], []
    for t in range(keep.shape[1]):
        deter, stoch, post = observe_step(
            rssm, deter, stoch, keep[:, t], act_emb[:, t], token_part[:, t], w_shared
        )
        deters.append(deter)
        stochs.append(stoch)
        posts.append(post)
    return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(posts, 1)


def rollout_step(
    rssm: RSSM, policy: Callable, feat: Tensor, deter: Tensor, stoch: Tensor, w_shared: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One imagination step: act on ``feat``, then sample the next prior state."""
    action = policy(feat)
    deter, stoch = rssm.img_sample(deter, stoch, action, w_shared)
    return action, deter, stoch
