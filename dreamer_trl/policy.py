"""The acting policy: a TensorDictModule that filters observations with the RSSM and
samples the actor, carrying (deter, stoch, prev_action) from step to step.

Keys (B = env batch dims, D deter, S×C stoch, A action dims):
  in:  observation keys, ``is_init`` [B, 1], ``deter`` [B, D], ``stoch`` [B, S, C],
       ``prev_action`` [B, A]
  out: ``action`` [B, A], ("next", ``deter`` / ``stoch`` / ``prev_action``) — the
       posterior after this observation, which TorchRL's step_mdp carries to the
       next step's input; replay stores it as the step's latent (replay context).
The env must carry the recurrent keys: add :meth:`ActingPolicy.make_primer` to it.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.envs.utils import ExplorationType, exploration_type

from .heads import Actor
from .world_model import WorldModel

RECURRENT_KEYS = ("deter", "stoch", "prev_action")


class ActingPolicy(TensorDictModuleBase):
    """Samples π in training and evaluation (reference behaviour); takes the mode when
    TorchRL's exploration type is DETERMINISTIC/MODE (``greedy`` eval); acts uniformly at
    random with ``random=True`` (prefill) while still filtering, so replay gets real
    latents for those steps too."""

    def __init__(
        self,
        world_model: WorldModel,
        actor: Actor,
        action_spec,
        obs_keys: list[str],
        random: bool = False,
    ):
        super().__init__()
        self.world_model, self.actor = world_model, actor
        self.action_spec, self.obs_keys = action_spec, list(obs_keys)
        # A buffer, so MultiAsyncCollector workers see it flip with the weights.
        self.register_buffer("_random", torch.tensor(bool(random)))
        self.in_keys = [*self.obs_keys, "is_init", *RECURRENT_KEYS]
        self.out_keys = ["action", *[("next", k) for k in RECURRENT_KEYS]]

    @property
    def random(self) -> bool:
        return bool(self._random)

    @random.setter
    def random(self, value: bool) -> None:
        self._random.fill_(bool(value))

    def make_primer(self) -> TensorDictPrimer:
        """Env transform that puts zero recurrent state into the root at reset."""
        rssm = self.world_model.rssm
        return TensorDictPrimer(
            Composite(
                deter=Unbounded(shape=(rssm.deter,)),
                stoch=Unbounded(shape=(rssm.stoch, rssm.classes)),
                prev_action=Unbounded(shape=(self.actor.action_dim,)),
            ),
            expand_specs=True,
        )

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        lead = td.batch_size
        flat = td.reshape(-1) if len(lead) != 1 else td
        wm = self.world_model
        token = wm.encoder({k: flat.get(k) for k in self.obs_keys})
        deter, stoch, _ = wm.rssm.obs_step(
            flat.get("deter"),
            flat.get("stoch"),
            flat.get("prev_action"),
            token,
            flat.get("is_init").reshape(-1),
        )
        params = self.actor(torch.cat([deter, stoch.flatten(-2)], -1))
        if self.random:
            action = self.action_spec.rand(flat.shape).to(params.dtype)
        elif exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE):
            action = self.actor.mode(params)
        else:
            action = self.actor.sample(params)
        values = {
            "action": action.to(self.action_spec.dtype),
            ("next", "deter"): deter,
            ("next", "stoch"): stoch,
            ("next", "prev_action"): action,
        }
        for key, value in values.items():
            td.set(key, value.reshape(*lead, *value.shape[1:]))
        return td
