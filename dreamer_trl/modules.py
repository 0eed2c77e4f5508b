"""TensorDict faces of the world model, actor and critic, for TorchRL pipelines.

The networks themselves are plain ``nn.Module``s working on tensors (the update's hot
loops stay free of TensorDict work); these wrappers give each a documented key contract:

* :func:`world_model_module` — in: a replay batch of steps [B, T+1] (observation keys,
  ``action``, ``reward``, ``is_first``, ``is_last``, ``is_terminal``, context ``deter`` /
  ``stoch``); out: ``("posterior", "deter")`` [B, T, D], ``("posterior", "stoch")``
  [B, T, S, C], ``("posterior", "logits")`` [B, T, S, C], ``("prior", "logits")`` and
  ``feat`` [B, T, E] for steps 1..T.
* :func:`actor_module` — in: ``feat`` [..., E]; out: ``action_params`` [..., P] (logits, or
  tanh-mean and std) and a sampled ``action`` [..., A].
* :func:`critic_module` — in: ``feat``; out: ``state_value`` [...] (two-hot expected value).
  :func:`slow_critic_module` is the same for the slow EMA critic.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import Tensor, nn

from .actor_critic import Critic, SlowCritic
from .heads import Actor
from .sequence import sequence_from_steps
from .world_model import WorldModel


class _ActorHead(nn.Module):
    def __init__(self, actor: Actor):
        super().__init__()
        self.actor = actor

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        params = self.actor(feat)
        return params, self.actor.sample(params)


class _ValueHead(nn.Module):
    def __init__(self, critic: Critic | SlowCritic):
        super().__init__()
        self.critic = critic

    def forward(self, feat: Tensor) -> Tensor:
        return self.critic.predict(self.critic(feat))


def actor_module(actor: Actor) -> TensorDictModule:
    return TensorDictModule(
        _ActorHead(actor), in_keys=["feat"], out_keys=["action_params", "action"]
    )


def critic_module(critic: Critic) -> TensorDictModule:
    return TensorDictModule(_ValueHead(critic), in_keys=["feat"], out_keys=["state_value"])


def slow_critic_module(slow: SlowCritic) -> TensorDictModule:
    return TensorDictModule(_ValueHead(slow), in_keys=["feat"], out_keys=["state_value"])


class WorldModelModule(TensorDictModuleBase):
    """Filters a replay batch of steps with the world model (see module docstring)."""

    def __init__(self, world_model: WorldModel):
        super().__init__()
        self.world_model = world_model
        keys = world_model.space.keys
        self.in_keys = [
            *keys,
            "action",
            "reward",
            "is_first",
            "is_last",
            "is_terminal",
            "deter",
            "stoch",
        ]
        self.out_keys = [
            ("posterior", "deter"),
            ("posterior", "stoch"),
            ("posterior", "logits"),
            ("prior", "logits"),
            "feat",
        ]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        wm = self.world_model
        seq = sequence_from_steps(td, wm.space.keys)
        deter, stoch, post = wm.rssm.observe(
            wm.encoder(seq.obs), seq.prev_action, seq.is_first, seq.deter, seq.stoch
        )
        out = td[:, 1:].empty()
        out.set(("posterior", "deter"), deter)
        out.set(("posterior", "stoch"), stoch)
        out.set(("posterior", "logits"), post)
        out.set(("prior", "logits"), wm.rssm.prior(deter))
        out.set("feat", torch.cat([deter, stoch.flatten(-2)], -1))
        return out


def world_model_module(world_model: WorldModel) -> WorldModelModule:
    return WorldModelModule(world_model)
