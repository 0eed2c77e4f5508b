"""DreamerV3 agent: world model, actor, critic, their loss and optimiser, built from
TorchRL specs and a config, with one ``update`` that is the whole training step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.data import Bounded, Categorical, Composite, OneHot, Unbounded

from .actor_critic import Critic
from .compiling import compile_fn
from .distributed import GradientAverage, World, broadcast_module, gather_rows
from .guard import NonFiniteGuard
from .heads import Actor
from .losses import DreamerV3Loss, total_loss
from .nets import HiddenSpec
from .optim import LaProp, zero_unless
from .precision import resolve_dtype
from .world_model import IntVector, ObsSpace, WorldModel

# Observation keys the agent reads when the config names none.
DEFAULT_OBS_KEYS = ("observation", "pixels")


def obs_space_from_spec(spec: Composite, keys: list[str] | None = None) -> ObsSpace:
    """Pick the agent's inputs from an env's observation spec.

    Vectors: float 1-D entries. Integer vectors: integer 1-D entries with bounded specs
    (`IntVector.from_spec`). Images: uint8 [C, H, W]. Anything else raises.
    """
    keys = list(keys) if keys else [k for k in DEFAULT_OBS_KEYS if k in spec.keys()]
    if not keys:
        raise ValueError(
            f"no observation key the agent can read: the env has {sorted(spec.keys())}; "
            f"name them with obs_keys=[...] (supported: float vectors [F], uint8 images [C,H,W])"
        )
    vectors, images, integers = {}, {}, {}
    for key in keys:
        if key not in spec.keys():
            raise ValueError(f"observation key {key!r} not in the env spec {sorted(spec.keys())}")
        leaf = spec[key]
        event, dtype = tuple(leaf.shape[len(spec.shape) :]), leaf.dtype  # drop env batch dims
        if dtype == torch.uint8 and len(event) == 3 and event[0] in (1, 3, 4):
            images[key] = tuple(int(s) for s in event)
        elif dtype.is_floating_point and len(event) == 1:
            vectors[key] = int(event[0])
        elif len(event) == 1:  # integer (or bool) vector: one-hot in, categorical out
            integers[key] = IntVector.from_spec(leaf, key)
        else:
            raise ValueError(
                f"observation {key!r} has unsupported spec (dtype {dtype}, shape {event}); "
                "supported: float vectors [F], bounded integer vectors [F] and uint8 images "
                "[C, H, W] with C in 1, 3, 4"
            )
    return ObsSpace(vectors, images, integers)


def action_info(spec) -> tuple[int, bool]:
    """(action dims, discrete?) of an env action spec; raises for unsupported kinds."""
    if isinstance(spec, OneHot):
        return int(spec.shape[-1]), True
    if isinstance(spec, (Bounded, Unbounded)) and spec.dtype.is_floating_point and spec.ndim >= 1:
        return int(spec.shape[-1]), False
    kind = type(spec).__name__
    hint = " (wrap categorical actions as one-hot: GymEnv(..., categorical_action_encoding=False))"
    raise ValueError(
        f"action spec {kind} {tuple(spec.shape)} {spec.dtype} is not supported; supported: "
        f"OneHot discrete actions and Bounded/Unbounded float vectors"
        + (hint if isinstance(spec, Categorical) else "")
    )


class DreamerV3Agent(nn.Module):
    """World model + actor + critic with the combined loss and one optimiser.

    ``update(batch)`` runs one training step on a replay batch of steps [B, T+1] and
    returns the loss TensorDict (detached), whose ``deter``/``stoch`` [B, T] refresh
    the replay context. ``guard`` records, on device, any update whose losses or gradients
    were not finite (read it with ``guard.read()``: a host sync); such an update is skipped
    (zero gradients, the return normaliser put back). ``algo.train_<part>=false`` freezes
    the world model, actor or critic (``trains``): its parameters, its optimiser state and
    its own state (the actor's return normaliser, the critic's slow copy) stay bit for bit.
    """

    def __init__(
        self, obs_space: ObsSpace, action_dim: int, discrete: bool, model: Mapping, algo: Mapping
    ):
        super().__init__()
        self.obs_space, self.action_dim, self.discrete = obs_space, action_dim, discrete
        norm = HiddenSpec(
            algo.get("norm", "rms"), algo.get("norm_eps", 1e-4), algo.get("hidden_bias", True)
        )
        init = algo.get("init", "fan_in")
        self.world_model = WorldModel(
            obs_space,
            action_dim,
            deter=model["deter"],
            hidden=model["hidden"],
            classes=model["classes"],
            units=model["units"],
            depth=model["depth"],
            stoch=model.get("stoch", 32),
            blocks=model.get("blocks", 8),
            unimix=algo.get("unimix", 0.01),
            norm=norm,
            num_bins=algo.get("num_bins", 255),
            bins=algo.get("bins", "symexp"),
            free_nats=algo.get("free_nats", 1.0),
            horizon=algo.get("horizon", 333),
            enc_layers=algo.get("enc_layers", 3),
            dec_layers=algo.get("dec_layers", 3),
            reward_layers=algo.get("reward_layers", 1),
            cont_layers=algo.get("cont_layers", 1),
            prior_layers=algo.get("prior_layers", 2),
            post_layers=algo.get("post_layers", 1),
            vector_units=algo.get("vector_units"),
            gru=algo.get("gru", "block"),
            initial=algo.get("initial", "zeros"),
            cnn=algo.get("cnn", "maxpool"),
            init=init,
            cont=algo.get("cont", "prob"),
        )
        feat = self.world_model.rssm.feat_dim
        act_cfg = algo.get("actor", {})
        self.actor = Actor(
            feat,
            action_dim,
            discrete,
            model["units"],
            act_cfg.get("layers", 3),
            act_cfg.get("outscale", 0.01),
            act_cfg.get("minstd", 0.1),
            act_cfg.get("maxstd", 1.0),
            norm,
            act_cfg.get("unimix", 0.0),
            init,
        )
        self.critic = Critic(
            feat,
            model["units"],
            algo.get("critic_layers", 3),
            algo.get("num_bins", 255),
            algo.get("bins", "symexp"),
            norm,
            init,
        )
        retnorm = algo.get("retnorm", {})
        self.loss = DreamerV3Loss(
            self.world_model,
            self.actor,
            self.critic,
            scales=dict(algo.get("loss_scales", {})),
            imag_horizon=algo.get("imag_horizon", 15),
            lam=algo.get("lam", 0.95),
            actor_entropy=algo.get("actor_entropy", 3e-4),
            slowreg=algo.get("slowreg", 1.0),
            slow_rate=algo.get("slow_rate", 0.02),
            repval=algo.get("repval", True),
            actor_grad=self._actor_grad(algo.get("actor_grad", "reinforce"), discrete),
            retnorm_rate=retnorm.get("rate", 0.01),
            retnorm_limit=retnorm.get("limit", 1.0),
            imag_dtype=resolve_dtype(algo.get("imag_dtype", "auto")),  # auto: for the CPU
        )
        self.loss.set_keys(observations=tuple(obs_space.keys))
        self.trains = trained_parts(algo)
        self._freeze()
        self.optimizer = make_optimizer(self, algo.get("optim", {}))
        self._loss_fn = self._loss_and_grads
        self.guard = NonFiniteGuard()  # not a module/buffer: stays out of the state_dict
        self.grad_average: GradientAverage | None = None  # set by data_parallel

    def data_parallel(self, world: World) -> None:
        """Make this agent one replica of ``world``'s data-parallel learner: rank 0's
        parameters and buffers on every rank, gradients (and loss finiteness) averaged
        over ranks in every ``update``, return percentiles over every rank's returns
        (``dreamer_trl.distributed``)."""
        if not world.multi:
            return
        broadcast_module(self, world)
        params = [p for m in self.trained_modules() for p in m.parameters()]
        self.grad_average = GradientAverage(params, world)
        self.loss.actor_loss.return_norm.gather = gather_rows

    @staticmethod
    def _actor_grad(setting: str, discrete: bool) -> str:
        """``auto`` (paper2023): backprop through the dynamics for continuous actions,
        REINFORCE for discrete ones."""
        if setting == "auto":
            return "reinforce" if discrete else "dynamics"
        return setting

    @classmethod
    def from_specs(
        cls,
        observation_spec: Composite,
        action_spec,
        model: Mapping,
        algo: Mapping,
        obs_keys: list[str] | None = None,
    ) -> DreamerV3Agent:
        dim, discrete = action_info(action_spec)
        return cls(obs_space_from_spec(observation_spec, obs_keys), dim, discrete, model, algo)

    def _freeze(self) -> None:
        """A frozen part's parameters take no gradient, so the optimiser, which steps only
        tensors with one, never touches them or their moments (a zero-gradient step would
        still move them by momentum). They stay in the optimiser, so checkpoints load
        either way. Every loss is still computed and still trains the other parts."""
        for part, on in self.trains.items():
            getattr(self, part).requires_grad_(on)

    def trained_modules(self) -> list[nn.Module]:
        """The modules the optimiser trains (not the slow critic)."""
        return [self.world_model, self.actor, self.critic]

    def num_params(self) -> int:
        return sum(p.numel() for m in self.trained_modules() for p in m.parameters())

    def _loss_and_grads(self, batch: TensorDictBase) -> TensorDict:
        out = self.loss(batch)
        total_loss(out).backward()
        return out

    def compile(self, **kwargs) -> None:
        """Compile the forward+backward of the loss with ``torch.compile``."""
        self._loss_fn = compile_fn(self._loss_and_grads, **kwargs)

    def compile_steps(self, observe_chunk: int = 1, **kwargs) -> None:
        """Compile the RSSM's observe steps (``observe_chunk`` per graph) and imagination
        step, and the heads over imagined states; the loops around them stay eager."""
        self.loss.wm_loss.compile_observe(observe_chunk, **kwargs)
        self.loss.actor_loss.compile_rollout(**kwargs)
        self.loss.critic_loss.compile_decode(**kwargs)

    def update(self, batch: TensorDictBase) -> TensorDict:
        self.optimizer.zero_grad(set_to_none=True)
        before = [x.clone() for x in self._forward_state()]
        out = self._loss_fn(batch)
        # Finiteness stays on device (no sync per update); the trainer reads the guard at
        # log time and before a checkpoint save. A non-finite update is skipped: the
        # optimiser steps with zero gradients and the forward's state is put back.
        losses_ok = self.guard.loss_flags(out)
        if self.grad_average is not None:  # data-parallel: every rank's mean, all flags ANDed
            losses_ok = self.grad_average(losses_ok)
        self.optimizer.step(finite=losses_ok.all())
        ok = self.guard.record(losses_ok, getattr(self.optimizer, "last_grads_finite", None))
        keep = ok if self.trains["actor"] else torch.zeros_like(ok)
        for x, old in zip(self._forward_state(), before):
            torch.where(keep, x, old, out=x)
        if self.trains["critic"]:  # the slow critic is the critic's: frozen with it
            self.loss.slow_critic.update(self.critic)
        return out.detach()

    def _forward_state(self) -> list[Tensor]:
        """The buffers the loss's forward itself updates: the return normaliser's EMAs
        (the actor's state: they scale only its advantages, so they freeze with it)."""
        norm = self.loss.actor_loss.return_norm
        return [norm.low, norm.high]


PARTS = ("world_model", "actor", "critic")  # what algo.train_<part> can freeze


def trained_parts(algo: Mapping) -> dict[str, bool]:
    """``algo.train_world_model`` / ``train_actor`` / ``train_critic`` (default true):
    which parts the updates move; at least one must."""
    trains = {part: bool(algo.get(f"train_{part}", True)) for part in PARTS}
    if not any(trains.values()):
        raise ValueError(
            "algo.train_world_model, algo.train_actor and algo.train_critic are all false: "
            "no update would change anything; valid: at least one true"
        )
    return trains


def make_optimizer(agent: DreamerV3Agent, cfg: Mapping) -> torch.optim.Optimizer:
    """``laprop`` (reference: one optimiser over all modules) or ``adam`` (paper2023:
    world model and actor/critic with their own lr and global-norm clip)."""
    name = cfg.get("name", "laprop")
    if name == "laprop":
        params = [p for m in agent.trained_modules() for p in m.parameters()]
        return LaProp(
            params,
            lr=cfg.get("lr", 4e-5),
            betas=(cfg.get("beta1", 0.9), cfg.get("beta2", 0.999)),
            eps=cfg.get("eps", 1e-20),
            agc=cfg.get("agc", 0.3),
            pmin=cfg.get("pmin", 1e-3),
            warmup=cfg.get("warmup", 1000),
        )
    if name == "adam":
        return ClippedAdam(
            [
                {
                    "params": list(agent.world_model.parameters()),
                    "lr": cfg.get("model_lr", 1e-4),
                    "clip": cfg.get("model_clip", 1000.0),
                    "eps": cfg.get("model_eps", 1e-8),
                },
                {
                    "params": list(agent.actor.parameters()),
                    "lr": cfg.get("actor_lr", 3e-5),
                    "clip": cfg.get("ac_clip", 100.0),
                    "eps": cfg.get("ac_eps", 1e-5),
                },
                {
                    "params": list(agent.critic.parameters()),
                    "lr": cfg.get("critic_lr", 3e-5),
                    "clip": cfg.get("ac_clip", 100.0),
                    "eps": cfg.get("ac_eps", 1e-5),
                },
            ]
        )
    raise ValueError(f"optimizer {name!r} unknown; valid: 'laprop', 'adam'")


class ClippedAdam(torch.optim.Adam):
    """Adam whose param groups each clip their gradient's global norm to ``clip`` first."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, foreach=True)

    @torch.no_grad()
    def step(self, closure=None, finite: Tensor | None = None):
        """Clip, then Adam; as LaProp, a non-finite update (its clip norms, or ``finite``)
        steps with zero gradients, selected on device, and sets ``last_grads_finite``."""
        norms, grads = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                norms.append(nn.utils.clip_grad_norm_(params, group["clip"], foreach=True))
                grads += [p.grad for p in params]
        if norms:
            self.last_grads_finite: Tensor = torch.isfinite(torch.stack(norms)).all()
            ok = self.last_grads_finite if finite is None else self.last_grads_finite & finite
            zero_unless(ok, grads)
        return super().step(closure)
