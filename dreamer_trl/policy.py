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
from torch import nn
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.envs.utils import ExplorationType, exploration_type

from .compiling import compile_fn
from .heads import Actor
from .world_model import WorldModel

RECURRENT_KEYS = ("deter", "stoch", "prev_action")


class ActingWorldModel(nn.Module):
    """The parts of a :class:`WorldModel` that filtering reads, ``encoder`` and ``rssm``
    (the same modules: their parameters are shared, not copied)."""

    def __init__(self, world_model: WorldModel):
        super().__init__()
        self.encoder, self.rssm = world_model.encoder, world_model.rssm


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
        # Only what acting reads: a collector copies (and refreshes) the policy's weights
        # into its workers or onto its device, and the decoder and heads are most of them.
        self.world_model, self.actor = ActingWorldModel(world_model), actor
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

    def _spec_on(self, device: torch.device):
        """The action spec on ``device`` (moved once), for drawing random actions there."""
        cached = getattr(self, "_device_spec", None)
        if cached is None or cached.device != device:
            cached = self._device_spec = self.action_spec.to(device)
        return cached

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

    def compile(self, **kwargs) -> None:
        """Compile the per-step tensor math (one fused graph instead of ~100 small ops).

        Compilation happens at the first step in whichever process acts (collector
        workers included); the compiled function itself is never pickled.
        """
        self._compile_kwargs = {"dynamic": False, **kwargs}
        self._compiled = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_compiled"] = None
        return state

    def _step_fn(self):
        if getattr(self, "_compile_kwargs", None) is None:
            return self._step
        if self._compiled is None:
            self._compiled = compile_fn(self._step, **self._compile_kwargs)
        return self._compiled

    def _step(self, obs: dict, deter, stoch, prev_action, is_first, greedy: bool):
        wm = self.world_model
        token = wm.encoder(obs)
        deter, stoch, _ = wm.rssm.obs_step(deter, stoch, prev_action, token, is_first)
        params = self.actor(torch.cat([deter, stoch.flatten(-2)], -1))
        action = self.actor.mode(params) if greedy else self.actor.sample(params)
        return deter, stoch, action

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        lead = td.batch_size
        flat = td.reshape(-1) if len(lead) != 1 else td
        greedy = exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE)
        deter, stoch, action = self._step_fn()(
            {k: flat.get(k) for k in self.obs_keys},
            flat.get("deter"),
            flat.get("stoch"),
            flat.get("prev_action"),
            flat.get("is_init").reshape(-1),
            greedy,
        )
        if self._random.device.type == "cpu":
            if self.random:
                action = self.action_spec.rand(flat.shape).to(action.dtype)
        else:  # bool() would wait for the accelerator every step: draw and select there
            action = random_where(self._random, action, self._spec_on(action.device))
        values = {
            "action": action.to(self.action_spec.dtype),
            ("next", "deter"): deter,
            ("next", "stoch"): stoch,
            ("next", "prev_action"): action,
        }
        for key, value in values.items():
            td.set(key, value.reshape(*lead, *value.shape[1:]))
        return td


def random_where(flag: torch.Tensor, action: torch.Tensor, spec) -> torch.Tensor:
    """``action`` [N, A], or a uniformly random one from ``spec`` where the 0-d bool
    ``flag`` is set: both drawn and selected on ``action``'s device, with no host sync."""
    return torch.where(flag, spec.rand(action.shape[:1]).to(action.dtype), action)
