"""DreamerV3 as TorchRL components.

Pieces a TorchRL pipeline can take one by one (see docs/architecture.md):

* models: :class:`WorldModel` (encoder, :class:`RSSM`, decoder, reward and continue
  heads), :class:`Actor`, :class:`Critic` with :class:`SlowCritic`; as TensorDict
  modules with documented keys: :func:`world_model_module`, :func:`actor_module`,
  :func:`critic_module`, :func:`slow_critic_module`;
* losses (TorchRL ``LossModule``): :class:`DreamerV3Loss` (everything, each piece once),
  :class:`WorldModelLoss`, :class:`ActorLoss`, :class:`CriticLoss`;
* :class:`LaProp` — the reference optimiser (AGC → RMS → momentum, warmup);
* acting: :class:`ActingPolicy` (a ``TensorDictModuleBase`` carrying the RSSM state) and the
  :class:`IncomingReward` env transform;
* replay: :class:`StepReplay` (``TensorDictReplayBuffer`` + ``StreamSliceSampler``, a TorchRL
  ``Sampler`` keeping each stream's slices incrementally; ``SliceSampler`` selectable) and the
  transition → step conversion :func:`transitions_to_steps`;
* :class:`DreamerV3Agent` — all of the above built from env specs and a config, with one
  ``update(batch)``; :func:`make_env` for gym / DMC / Atari;
* using a trained agent: :func:`load_policy` (checkpoint, run dir, MLflow run id or
  ``models:/``) → :class:`Policy` with ``initial_state()`` and ``act(obs, state)`` on numpy
  or torch; ``dreamer_trl.export`` writes its acting step as ONNX / TorchScript / pt2.
"""

from .actor_critic import Critic, ReturnNormalizer, SlowCritic
from .agent import DreamerV3Agent, action_info, obs_space_from_spec
from .envs import make_env
from .heads import Actor
from .inference import Policy, PolicyState, load_policy
from .losses import ActorLoss, CriticLoss, DreamerV3Loss, WorldModelLoss, total_loss
from .modules import actor_module, critic_module, slow_critic_module, world_model_module
from .optim import LaProp
from .policy import ActingPolicy
from .replay import StepReplay
from .rssm import RSSM
from .sequence import Sequence, sequence_from_steps, transitions_to_steps
from .sizes import MODEL_SIZES
from .transforms import IncomingReward
from .world_model import ObsSpace, WorldModel

__all__ = [
    "RSSM",
    "ActingPolicy",
    "Actor",
    "ActorLoss",
    "Critic",
    "CriticLoss",
    "DreamerV3Agent",
    "DreamerV3Loss",
    "IncomingReward",
    "LaProp",
    "MODEL_SIZES",
    "ObsSpace",
    "Policy",
    "PolicyState",
    "ReturnNormalizer",
    "Sequence",
    "SlowCritic",
    "StepReplay",
    "WorldModel",
    "WorldModelLoss",
    "action_info",
    "load_policy",
    "make_env",
    "obs_space_from_spec",
    "sequence_from_steps",
    "total_loss",
    "transitions_to_steps",
    "actor_module",
    "critic_module",
    "slow_critic_module",
    "world_model_module",
]
__version__ = "0.1.0"
