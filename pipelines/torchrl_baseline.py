"""TorchRL 0.14.1's own DreamerV3 update, as a speed baseline for ``dreamer_trl``.

What is built (all from the installed ``torchrl`` package, default code paths):

* World model (``tensordict.nn.TensorDictSequential``): ``symlog`` + ``DreamerV3MLP`` vector
  encoder (3 x 64), ``RSSMRolloutV3`` over ``RSSMPriorV3(recurrent_model="block_gru")`` (deter
  512, hidden 64, 8 blocks, 1 dynamics layer, 2 prior layers, 32 x 4 categoricals, unimix 0.01)
  and ``RSSMPosteriorV3(use_rms_norm=True)`` (1 layer, unimix 0.01), a ``DreamerV3MLP`` decoder
  (3 x 64, symlog-space output then ``symexp``), a two-hot reward head (1 x 64, 255 bins,
  output scale 0) and a continue head (1 x 64).
* ``DreamerV3ModelLoss(kl_mode="separate")``: dyn 1.0 / rep 0.1, free nats 1 on the KL summed
  over the categoricals, unimix 0.01, continue target ``(1 - terminated) * (1 - 1/333)``.
* ``DreamerV3ActorLoss``: imagination through ``DreamerEnv`` + ``WorldModelWrapper`` for
  ``horizon`` steps from every posterior state (B*T starts), REINFORCE, entropy 3e-4,
  ``TDLambda(gamma=1.0, lmbda=0.95)`` with the predicted continuation as discount,
  ``PercentileValueNorm`` return scale (5th/95th EMA, rate 0.01, min 1).
* ``DreamerV3ValueLoss(value_loss="two_hot", slow_critic_regularization=1.0)`` plus its replay
  value term (weight 0.3, horizon 333) composed by ``DreamerV3Loss``; ``SoftUpdate(tau=0.02)``.
* ``DreamerV3Optimizer`` (AGC 0.3 / pmin 1e-3, RMS beta2 0.999 eps 1e-20, momentum 0.9, lr 4e-5,
  1000 warm-up updates: LaProp) over ``DreamerV3Loss.parameters()``, driven by
  ``DreamerV3OptimizationStepper`` with its defaults (eager on CPU, compile+CUDA graph on CUDA).

Settings that differ from the reference (/work/shared/SPEC.md) because of TorchRL's API:

* TorchRL ships no continuous DreamerV3 actor. The actor here is the one of TorchRL's own
  ``sota-implementations/dreamer_v3`` example: ``DreamerV3MLP`` trunk (3 x 64) with separate mean
  and std heads (init scale 0.01), ``Normal(tanh(mu), 0.9 * sigmoid(x + 2) + 0.1)`` via
  ``IndependentNormal``. Same parameter count as one 2*act output layer.
* Imagination runs through ``EnvBase.rollout`` with a reparameterised (``rsample``) policy and no
  ``no_grad``: the graph through the dynamics is built although REINFORCE never uses it.
* TorchRL's (obs_t, a_t, next obs) layout: the world model encodes only ``("next",
  "observation")`` and masks state, belief and action at ``is_init``; the reset observation of
  an episode is never encoded and the first action is dropped.
* No replay-context write-back (TorchRL returns the posteriors under ``replay_context``; storing
  them is the caller's job): the batch starts from zero latents as in a plain replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tensordict import TensorDict
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs.model_based import DreamerEnv
from torchrl.modules import (
    DreamerV3MLP,
    IndependentNormal,
    RSSMPosteriorV3,
    RSSMPriorV3,
    RSSMRolloutV3,
    SymExpTwoHot,
    WorldModelWrapper,
)
from torchrl.modules.models.model_based import _dreamer_v3_init
from torchrl.objectives import (
    DreamerV3ActorLoss,
    DreamerV3Loss,
    DreamerV3ModelLoss,
    DreamerV3ValueLoss,
    SoftUpdate,
    symexp,
    symlog,
)
from torchrl.objectives.utils import ValueEstimators
from torchrl.trainers.algorithms import DreamerV3OptimizationStepper, DreamerV3Optimizer

# size1m walker shapes (SPEC.md "Sizes").
DETER = 512
HIDDEN = 64
NUM_CATEGORICALS = 32
NUM_CLASSES = 4
STOCH = NUM_CATEGORICALS * NUM_CLASSES
NUM_BLOCKS = 8
NUM_BINS = 255
CONTINUE_HORIZON = 333.0
FEAT = STOCH + DETER


class _ContinuousActor(nn.Module):
    """Bounded-normal DreamerV3 actor, as in TorchRL's sota example (not in the wheel)."""

    def __init__(self, action_dim: int, min_std: float = 0.1, max_std: float = 1.0) -> None:
        super().__init__()
        self.backbone = DreamerV3MLP(FEAT, None, depth=3, num_cells=HIDDEN)
        self.mean_head = nn.Linear(HIDDEN, action_dim)
        self.std_head = nn.Linear(HIDDEN, action_dim)
        for head in (self.mean_head, self.std_head):
            _dreamer_v3_init(head)
            with torch.no_grad():
                head.weight.mul_(0.01)
        self.min_std = min_std
        self.max_std = max_std

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.backbone(belief, state)
        mean = self.mean_head(hidden).tanh()
        std = (self.max_std - self.min_std) * torch.sigmoid(self.std_head(hidden) + 2)
        return mean, std + self.min_std


def _head(out_features: int, depth: int, outscale: float = 1.0) -> DreamerV3MLP:
    return DreamerV3MLP(FEAT, out_features, depth=depth, num_cells=HIDDEN, outscale=outscale)


def _build_rssm(act_dim: int) -> tuple[RSSMPriorV3, RSSMRolloutV3]:
    prior_net = RSSMPriorV3(
        action_shape=torch.Size([act_dim]),
        hidden_dim=HIDDEN,
        rnn_hidden_dim=DETER,
        num_categoricals=NUM_CATEGORICALS,
        num_classes=NUM_CLASSES,
        action_dim=act_dim,
        recurrent_model="block_gru",
        num_blocks=NUM_BLOCKS,
        num_layers=1,
        prior_num_layers=2,
        unimix=0.01,
    )
    posterior_net = RSSMPosteriorV3(
        hidden_dim=HIDDEN,
        num_categoricals=NUM_CATEGORICALS,
        num_classes=NUM_CLASSES,
        rnn_hidden_dim=DETER,
        obs_embed_dim=HIDDEN,
        use_rms_norm=True,
        num_layers=1,
        unimix=0.01,
    )
    # Exactly these keys select RSSMRolloutV3's tensor fast path (_check_fast_path).
    prior = TensorDictModule(
        prior_net,
        in_keys=["state", "belief", "action"],
        out_keys=[("next", "prior_logits"), ("next", "state"), ("next", "belief")],
    )
    posterior = TensorDictModule(
        posterior_net,
        in_keys=[("next", "belief"), ("next", "encoded_latents")],
        out_keys=[("next", "posterior_logits"), ("next", "state")],
    )
    return prior_net, RSSMRolloutV3(prior, posterior, reset_key="is_init")


def _build_world_model(
    obs_dim: int, act_dim: int
) -> tuple[TensorDictSequential, RSSMPriorV3, DreamerV3MLP, DreamerV3MLP]:
    encoder = TensorDictSequential(
        TensorDictModule(
            symlog, in_keys=[("next", "observation")], out_keys=[("next", "symlog_obs")]
        ),
        TensorDictModule(
            DreamerV3MLP(obs_dim, None, depth=3, num_cells=HIDDEN),
            in_keys=[("next", "symlog_obs")],
            out_keys=[("next", "encoded_latents")],
        ),
    )
    prior_net, rollout = _build_rssm(act_dim)
    # The loss symlogs prediction and target: decode in symlog space, symexp to raw.
    decoder = TensorDictSequential(
        TensorDictModule(
            _head(obs_dim, depth=3),
            in_keys=[("next", "state"), ("next", "belief")],
            out_keys=[("next", "reco_symlog")],
        ),
        TensorDictModule(
            symexp, in_keys=[("next", "reco_symlog")], out_keys=[("next", "reco_pixels")]
        ),
    )
    reward_net = _head(NUM_BINS, depth=1, outscale=0.0)
    reward_head = TensorDictSequential(
        TensorDictModule(
            reward_net,
            in_keys=[("next", "belief"), ("next", "state")],
            out_keys=[("next", "reward_logits")],
        ),
        TensorDictModule(
            SymExpTwoHot(NUM_BINS),
            in_keys=[("next", "reward_logits")],
            out_keys=[("next", "reward")],
        ),
    )
    continue_net = _head(1, depth=1)
    continue_head = TensorDictModule(
        continue_net,
        in_keys=[("next", "belief"), ("next", "state")],
        out_keys=[("next", "continue_pred")],
    )
    world_model = TensorDictSequential(encoder, rollout, decoder, reward_head, continue_head)
    return world_model, prior_net, reward_net, continue_net


def _build_imagination_env(
    prior_net: RSSMPriorV3, reward_net: DreamerV3MLP, act_dim: int, device: str
) -> DreamerEnv:
    transition = TensorDictModule(
        prior_net, in_keys=["state", "belief", "action"], out_keys=["_", "state", "belief"]
    )
    reward = TensorDictSequential(
        TensorDictModule(reward_net, in_keys=["belief", "state"], out_keys=["reward_logits"]),
        TensorDictModule(SymExpTwoHot(NUM_BINS), in_keys=["reward_logits"], out_keys=["reward"]),
    )
    env = DreamerEnv(
        WorldModelWrapper(transition, reward),
        prior_shape=torch.Size([STOCH]),
        belief_shape=torch.Size([DETER]),
        device=device,
    )
    # Specs set by hand, as in DreamerV3Loss's docstring: no real env is needed.
    env.observation_spec = Composite(state=Unbounded(STOCH), belief=Unbounded(DETER))
    env.state_spec = env.observation_spec.clone()
    env.action_spec = Bounded(-1.0, 1.0, (act_dim,))
    env.reward_spec = Unbounded((1,))
    return env


def _build_actor(act_dim: int) -> ProbabilisticTensorDictSequential:
    return ProbabilisticTensorDictSequential(
        TensorDictModule(
            _ContinuousActor(act_dim), in_keys=["state", "belief"], out_keys=["loc", "scale"]
        ),
        ProbabilisticTensorDictModule(
            in_keys=["loc", "scale"],
            out_keys=["action"],
            default_interaction_type=InteractionType.RANDOM,
            distribution_class=IndependentNormal,
            return_log_prob=True,
            log_prob_key="action_log_prob",
        ),
    )


def _build_value() -> TensorDictSequential:
    return TensorDictSequential(
        TensorDictModule(
            _head(NUM_BINS, depth=3, outscale=0.0),
            in_keys=["belief", "state"],
            out_keys=["state_value_logits"],
        ),
        TensorDictModule(
            SymExpTwoHot(NUM_BINS), in_keys=["state_value_logits"], out_keys=["state_value"]
        ),
    )


def _build_loss(
    obs_dim: int, act_dim: int, horizon: int, device: str
) -> tuple[DreamerV3Loss, SoftUpdate]:
    world_model, prior_net, reward_net, continue_net = _build_world_model(obs_dim, act_dim)
    model_loss = DreamerV3ModelLoss(
        world_model,
        lambda_continue=1.0,
        kl_mode="separate",
        lambda_dynamic=1.0,
        lambda_representation=0.1,
        unimix=0.01,
        continue_target_scale=1.0 - 1.0 / CONTINUE_HORIZON,
        free_bits=1.0,
        detach_output=False,  # required by the replay value loss
    )
    model_loss.set_keys(pixels="observation", reco_pixels="reco_pixels")
    continuation = TensorDictSequential(
        TensorDictModule(continue_net, in_keys=["belief", "state"], out_keys=["continue_logits"]),
        TensorDictModule(nn.Sigmoid(), in_keys=["continue_logits"], out_keys=["continuation"]),
    )
    value = _build_value()
    actor_loss = DreamerV3ActorLoss(
        _build_actor(act_dim),
        value,
        _build_imagination_env(prior_net, reward_net, act_dim, device),
        continuation_model=continuation,
        imagination_horizon=horizon,
        use_reinforce=True,
        entropy_bonus=3e-4,
    )
    # gamma 1: the continuation probability (1 - 1/333 per step) is the discount.
    actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=1.0, lmbda=0.95)
    value_loss = DreamerV3ValueLoss(
        value, value_loss="two_hot", actor_loss=actor_loss, slow_critic_regularization=1.0
    )
    loss = DreamerV3Loss(
        model_loss,
        actor_loss,
        value_loss,
        replay_value_loss_weight=0.3,
        continuation_horizon=CONTINUE_HORIZON,
        lmbda=0.95,
    )
    return loss.to(device), SoftUpdate(value_loss, tau=0.02)


def _synthetic_batch(
    batch_size: int, seq_len: int, obs_dim: int, act_dim: int, device: str
) -> TensorDict:
    """Walker-shaped replay sample in TorchRL's (obs_t, a_t, next obs) layout."""
    shape = (batch_size, seq_len)
    is_init = torch.zeros(*shape, 1, dtype=torch.bool)
    is_init[:, 0] = True  # every sequence starts an episode: zero latents are then exact
    terminated = torch.zeros(*shape, 1, dtype=torch.bool)
    return TensorDict(
        {
            "state": torch.zeros(*shape, STOCH),
            "belief": torch.zeros(*shape, DETER),
            "action": torch.rand(*shape, act_dim) * 2 - 1,
            "is_init": is_init,
            "next": {
                "observation": torch.randn(*shape, obs_dim) * 3,
                "reward": torch.rand(*shape, 1),
                "done": terminated.clone(),
                "terminated": terminated,
            },
        },
        batch_size=shape,
        device=device,
    )


def _param_count(module: nn.Module) -> int:
    # Module.parameters() de-duplicates the modules shared between the three losses.
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_torchrl_update(
    batch_size: int = 16,
    seq_len: int = 64,
    obs_dim: int = 24,
    act_dim: int = 6,
    horizon: int = 15,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Callable[[], dict[str, float]], int]:
    """Build TorchRL's DreamerV3 learner; return (one-update closure, trainable param count).

    Each call of the closure runs ``DreamerV3OptimizationStepper.step`` on the same synthetic
    batch: ``DreamerV3Loss`` forward (world model, imagination, critic, replay value), backward,
    ``DreamerV3Optimizer.step`` and ``SoftUpdate.step``. Seeded once here, so a fresh build
    followed by the same number of calls gives the same numbers.
    """
    torch.manual_seed(seed)
    loss, target_updater = _build_loss(obs_dim, act_dim, horizon, device)
    optimizer = DreamerV3Optimizer(loss.parameters(), lr=4e-5, warmup_steps=1000)
    stepper = DreamerV3OptimizationStepper(loss, optimizer, target_updater)
    batch = _synthetic_batch(batch_size, seq_len, obs_dim, act_dim, device)
    if device != "cpu":
        stepper.warmup(batch)  # the CUDA default compiles and captures the step

    def update() -> dict[str, float]:
        metrics = stepper.step(None, batch)
        return {key: float(value) for key, value in metrics.items() if value.numel() == 1}

    return update, _param_count(loss)


def _bench(warmup: int = 3, timed: int = 10) -> None:
    update, n_params = make_torchrl_update()
    for _ in range(warmup):
        update()
    start = time.perf_counter()
    for _ in range(timed):
        losses = update()
    seconds = (time.perf_counter() - start) / timed
    print(f"torchrl {__import__('torchrl').__version__} DreamerV3 update (size1m, B16 T64 H15)")
    print(f"params: {n_params}  threads: {torch.get_num_threads()}")
    print(f"seconds/update: {seconds:.3f}")
    print({key: round(value, 4) for key, value in sorted(losses.items())})


if __name__ == "__main__":
    _bench()
