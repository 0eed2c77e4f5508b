"""Use a trained agent outside TorchRL: ``policy = load_policy(<checkpoint | run dir | MLflow
run id | models:/name/version>)``, then ``state = policy.initial_state()`` and
``action, state = policy.act(obs, state)`` once per env step.

Observations are numpy arrays or torch tensors, one observation or a batch [B, ...]: a bare
array for a policy with one observation key, else a dict by key (a dm_control observation
dict is concatenated in sorted key order, as ``make_env`` does). Images are uint8 [C, H, W]
or [H, W, C]. Actions come back in the env's own action space: the action index for a
discrete env, the env's bounds for a continuous one (the agent acts in [-1, 1]; values are
clipped and mapped linearly, as the training env did), as numpy when the observation was
numpy. A new episode starts from ``initial_state`` (or ``reset(state, done)`` for a vector
env): its first step masks the carried latent and previous action (``is_first``).

The acting step is :class:`ActingStep`: encoder, one RSSM posterior step and the actor on
plain tensors, with the sampling noise as inputs, so ``dreamer_trl.export`` can export it
and an exported graph reproduces the eager one. ``act`` draws that noise from torch's
generator in the order :class:`~dreamer_trl.policy.ActingPolicy` draws it, so both act the
same from the same seed. Shapes: B batch, D deter, S×C stoch, A action dims.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .agent import DreamerV3Agent
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from .compiling import compile_fn
from .distributions import softmax_small
from .tracking import is_run_id
from .world_model import IntVector, ObsSpace

__all__ = ["ActingStep", "ActionSpace", "Policy", "PolicyState", "load_policy"]

_SOURCES = (
    "a checkpoint dir, a run dir, a state.pt, an MLflow run id, a logged MLflow model dir or a "
    "models:/<name>/<version> (runs:/<id>/policy) URI"
)
EXPORT_SUFFIXES = {".onnx": "an ONNX", ".pt2": "a torch.export"}
POLICY_KIND = "dreamer_trl.policy"  # ``kind`` of a policy file (weights for acting only)
MLFLOW_MODEL = "policy"  # a run's logged model: runs:/<run id>/policy
MLFLOW_CHECKPOINT = "checkpoint"  # the policy file's artefact name inside that model


class PolicyState(NamedTuple):
    """The recurrent state carried between steps, batch [B] first, on the policy's device."""

    deter: Tensor  # [B, D]
    stoch: Tensor  # [B, S, C] one-hot
    prev_action: Tensor  # [B, A] the agent's last action (one-hot, or the unclipped sample)
    is_first: Tensor  # [B] bool: the next observation starts an episode


@dataclass(frozen=True)
class ActionSpace:
    """The env's own action space: ``dim`` actions (discrete: returned as an index) or a
    box with ``low``/``high`` per dim (the agent's [-1, 1] is clipped and mapped onto it;
    without bounds it is returned as the agent emits it)."""

    discrete: bool
    dim: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    @classmethod
    def from_env(cls, env: Any) -> ActionSpace:
        """From a ``make_env`` env: the agent's spec, and the base env's true bounds."""
        from torchrl.data import Bounded

        from .agent import action_info

        dim, discrete = action_info(env.action_spec)
        base = getattr(env, "base_env", env).action_spec
        if discrete or not isinstance(base, Bounded):
            return cls(discrete, dim)
        low = base.space.low.reshape(-1, dim)[0].double().tolist()
        high = base.space.high.reshape(-1, dim)[0].double().tolist()
        return cls(False, dim, tuple(low), tuple(high))


class ActingStep(nn.Module):
    """One acting step on plain tensors, noise in, env action and new state out.

    ``forward(*obs, deter, stoch, prev_action, is_first, stoch_noise, action_noise,
    deterministic)``, observations in ``obs_keys`` order, returns ``(action, deter, stoch,
    prev_action)``: ``action`` in the env's space (int64 [B] index, or float32 [B, A] in its
    bounds) and the state after this observation (``prev_action`` is the agent's action).
    ``stoch_noise`` [B, S] is uniform in [0, 1) (inverse-CDF sample of each latent
    categorical); ``action_noise`` is uniform [B, 1] (discrete) or standard normal [B, A];
    ``deterministic`` (bool, 0-d) takes the actor's mode, the latent is sampled either way
    (as ``ActingPolicy``'s greedy mode).
    """

    def __init__(self, world_model: nn.Module, actor: nn.Module, obs_keys, space: ActionSpace):
        super().__init__()
        self.world_model, self.actor = world_model, actor
        self.obs_keys, self.space = list(obs_keys), space
        if space.low is not None:
            low, high = torch.tensor(space.low), torch.tensor(space.high)
            self.register_buffer("loc", ((high + low) / 2).float(), persistent=False)
            self.register_buffer("scale", ((high - low) / 2).float(), persistent=False)

    def noise_shapes(self, batch: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of ``stoch_noise`` and ``action_noise`` for a batch."""
        rssm = self.world_model.rssm
        return (batch, rssm.stoch), (batch, 1 if self.space.discrete else self.space.dim)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = len(self.obs_keys)
        obs = dict(zip(self.obs_keys, inputs[:n]))
        deter, stoch, prev_action, is_first, stoch_noise, action_noise, deterministic = inputs[n:]
        rssm = self.world_model.rssm
        token = self.world_model.encoder(obs)
        # RSSM.obs_step (rssm.observe_step), its categorical sample drawn from the given
        # uniforms; tests keep both equal.
        keep = (~is_first).to(token.dtype).unsqueeze(-1)
        act_emb = rssm.embed_action(prev_action * keep)
        deter = rssm.core(*rssm.restart(deter, stoch, keep), act_emb, rssm.shared_weight())
        post = rssm._post_from_parts(deter, rssm._token_part(token))
        stoch = onehot_sample(post, stoch_noise.unsqueeze(-1))
        params = self.actor(torch.cat([deter, stoch.flatten(-2)], -1))
        if self.actor.discrete:
            sample = onehot_sample(params, action_noise)
        else:
            mean, std = params.chunk(2, -1)
            sample = mean + std * action_noise
        action = torch.where(deterministic, self.actor.mode(params), sample)
        return self.env_action(action), deter, stoch, action

    def env_action(self, action: Tensor) -> Tensor:
        """The agent's action [B, A] in the env's space (what the training env applied)."""
        if self.space.discrete:
            return action.argmax(-1)
        if self.space.low is None:
            return action
        return action.clamp(-1.0, 1.0) * self.scale + self.loc


def onehot_sample(logits: Tensor, uniform: Tensor) -> Tensor:
    """One-hot sample [..., C] of categoricals given logits, with ``uniform`` [..., 1]:
    the class is the number of cumulative probabilities below it, as
    ``distributions.sample_probs`` draws (which takes the uniform from torch's generator)."""
    probs = softmax_small(logits)
    classes = probs.shape[-1]
    index = (probs.float().cumsum(-1) < uniform).sum(-1).clamp(max=classes - 1)
    return (index.unsqueeze(-1) == torch.arange(classes, device=probs.device)).to(probs.dtype)


class Policy:
    """A trained DreamerV3 policy for plain Python loops (see the module docstring).

    Built by :func:`load_policy`; ``world_model`` and ``actor`` are the agent's modules
    (eval mode, no gradients), ``step`` the :class:`ActingStep` that ``act`` runs.
    """

    def __init__(
        self,
        world_model: nn.Module,
        actor: nn.Module,
        obs_space: ObsSpace,
        action_space: ActionSpace,
        config: Mapping | None = None,
        env_steps: int = 0,
        source: str = "",
    ):
        self.world_model, self.actor = world_model.eval(), actor.eval()
        self.obs_space, self.action_space = obs_space, action_space
        self.config, self.env_steps, self.source = dict(config or {}), env_steps, source
        self.step = ActingStep(world_model, actor, obs_space.keys, action_space)
        self.step.to(self.device)
        self._step_fn = self.step
        self._suite = (self.config.get("env") or {}).get("suite")

    @property
    def device(self) -> torch.device:
        return next(self.world_model.parameters()).device

    @property
    def obs_keys(self) -> list[str]:
        return self.obs_space.keys

    def __repr__(self) -> str:
        kind = "discrete" if self.action_space.discrete else "continuous"
        return (
            f"Policy({self.source or 'in memory'}: obs {self.obs_keys}, {kind} actions "
            f"[{self.action_space.dim}], {self.env_steps} env steps)"
        )

    def compile(self, **kwargs: Any) -> Policy:
        """``torch.compile`` the acting step (compiled at the first ``act``)."""
        self._step_fn = compile_fn(self.step, **{"dynamic": False, **kwargs})
        return self

    # ---- state ------------------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> PolicyState:
        """The start state (the RSSM's: zeros, or a learned one) of ``batch`` envs whose next
        observation starts an episode."""
        if int(batch) < 1:
            raise ValueError(f"initial_state(batch={batch!r}): batch must be an integer >= 1")
        rssm, dev = self.world_model.rssm, self.device
        deter, stoch = rssm.initial(int(batch), dev)
        prev = torch.zeros(int(batch), self.actor.action_dim, device=dev)
        return PolicyState(deter, stoch, prev, torch.ones(int(batch), dtype=torch.bool, device=dev))

    def reset(self, state: PolicyState, done: Any = None) -> PolicyState:
        """``state`` with the envs where ``done`` (bool [B]; None: all) starting anew."""
        if done is None:
            return state._replace(is_first=torch.ones_like(state.is_first))
        mask = torch.as_tensor(np.asarray(done, dtype=bool)).reshape(-1).to(self.device)
        if mask.shape != state.is_first.shape:
            raise ValueError(
                f"reset: done has {mask.numel()} entries, the state is for a batch of "
                f"{state.is_first.numel()}"
            )
        return state._replace(is_first=state.is_first | mask)

    # ---- acting -----------------------------------------------------------------------
    @torch.no_grad()
    def act(
        self, obs: Any, state: PolicyState, deterministic: bool = False
    ) -> tuple[Any, PolicyState]:
        """One step: (action in the env's space, the state for the next step).

        ``deterministic`` takes the actor's mode (the reference samples, in evaluation
        too). The action is numpy when ``obs`` was, else a tensor on the policy's device;
        unbatched when ``obs`` was (then ``state`` is for a batch of 1).
        """
        tensors, batched, to_numpy = self.obs_tensors(obs)
        n = tensors[0].shape[0]
        self._check_state(state, n)
        noise = self.draw_noise(n, deterministic)
        flag = torch.tensor(bool(deterministic), device=self.device)
        action, deter, stoch, prev = self._step_fn(*tensors, *state, *noise, flag)
        state = PolicyState(deter, stoch, prev, torch.zeros_like(state.is_first))
        action = action if batched else action[0]
        # [()] makes a single discrete action a numpy scalar (np.int64), as gym's are.
        return (action.cpu().numpy()[()] if to_numpy else action), state

    def draw_noise(self, batch: int, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """The step's noise from torch's generator, drawn as ``ActingPolicy`` draws it: the
        latent's uniforms, then (sampling only) the action's uniform or normals."""
        stoch_shape, action_shape = self.step.noise_shapes(batch)
        stoch = torch.rand(stoch_shape, device=self.device)
        if deterministic:
            return stoch, torch.zeros(action_shape, device=self.device)
        draw = torch.rand if self.action_space.discrete else torch.randn
        return stoch, draw(action_shape, device=self.device)

    def _check_state(self, state: PolicyState, batch: int) -> None:
        if not isinstance(state, PolicyState):
            raise TypeError(
                f"state must be the PolicyState of initial_state() or act(), got "
                f"{type(state).__name__}"
            )
        if state.deter.shape[0] != batch:
            raise ValueError(
                f"state is for a batch of {state.deter.shape[0]}, the observation is a batch "
                f"of {batch}; start it with initial_state(batch={batch})"
            )

    # ---- observations -----------------------------------------------------------------
    def obs_tensors(self, obs: Any) -> tuple[list[Tensor], bool, bool]:
        """(tensors [B, ...] in ``obs_keys`` order, batched?, was numpy?); one-line
        ValueError for a missing key or a wrong shape or dtype."""
        values = self._by_key(obs)
        to_numpy = not any(isinstance(v, Tensor) for v in values.values())
        converted = {k: self._convert(k, v) for k, v in values.items()}
        batched = {k: b for k, (_, b) in converted.items()}
        if len(set(batched.values())) > 1:
            raise ValueError(f"observation entries mix batched and single ones: {batched}")
        tensors = [converted[k][0] for k in self.obs_keys]
        sizes = {k: t.shape[0] for k, t in zip(self.obs_keys, tensors)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"observation entries have different batch sizes: {sizes}")
        return tensors, next(iter(batched.values())), to_numpy

    def _by_key(self, obs: Any) -> dict[str, Any]:
        keys = self.obs_keys
        if not isinstance(obs, Mapping):
            if len(keys) > 1:
                raise ValueError(
                    f"observation is a {type(obs).__name__}, the policy reads {len(keys)} "
                    f"entries: pass a dict with keys {keys}"
                )
            return {keys[0]: obs}
        if all(k in obs for k in keys):
            return {k: obs[k] for k in keys}
        if keys == ["observation"] and self.obs_space.vectors and self._suite == "dmc":
            return {"observation": _concat_dmc(obs, self.obs_space.vectors["observation"])}
        missing = [k for k in keys if k not in obs]
        raise ValueError(f"observation has keys {sorted(obs)}; missing {missing} (reads {keys})")

    def _convert(self, key: str, value: Any) -> tuple[Tensor, bool]:
        """One entry as a tensor [B, ...] on the device, and whether it came batched."""
        x = value if isinstance(value, Tensor) else torch.from_numpy(_array(key, value))
        space = self.obs_space
        if key in space.images:
            x, batched = _image(key, x, space.images[key])
        elif key in space.integers:
            x, batched = _vector(key, x, space.integers[key].size, integer=True)
        else:
            x, batched = _vector(key, x, space.vectors[key], integer=False)
        return x.to(self.device), batched


def _array(key: str, value: Any) -> np.ndarray:
    array = np.ascontiguousarray(value)  # torch takes no negative strides (flipped frames)
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"observation {key!r} has dtype {array.dtype}; expected numbers (float or integer "
            "vectors, uint8 images)"
        )
    return array


def _vector(key: str, x: Tensor, size: int, integer: bool) -> tuple[Tensor, bool]:
    if integer and (x.dtype.is_floating_point or x.is_complex()):
        raise ValueError(
            f"observation {key!r} has dtype {x.dtype}; this policy reads it as integers "
            f"(int or bool vector [{size}])"
        )
    if x.is_complex() or (not integer and x.dtype == torch.bool):
        raise ValueError(f"observation {key!r} has dtype {x.dtype}; expected a float vector")
    if not (x.shape == (size,) or (x.dim() == 2 and x.shape[1] == size)):
        raise ValueError(
            f"observation {key!r} has shape {tuple(x.shape)}; expected ({size},) or (B, {size})"
        )
    batched = x.dim() == 2
    x = x if batched else x.unsqueeze(0)
    return (x.long() if integer else x.float()), batched


def _image(key: str, x: Tensor, shape: tuple[int, int, int]) -> tuple[Tensor, bool]:
    if x.dtype != torch.uint8:
        raise ValueError(
            f"observation {key!r} has dtype {x.dtype}; images are uint8 (0..255) {shape} "
            "[C, H, W] or [H, W, C]"
        )
    c, h, w = shape
    hwc = (h, w, c)
    if tuple(x.shape[-3:]) == hwc and tuple(x.shape[-3:]) != shape:
        x = x.movedim(-1, -3)  # gym's channel-last layout
    if x.dim() not in (3, 4) or tuple(x.shape[-3:]) != shape:
        raise ValueError(
            f"observation {key!r} has shape {tuple(x.shape)}; expected {shape} or {hwc}, "
            "optionally with a batch dim first"
        )
    batched = x.dim() == 4
    return (x if batched else x.unsqueeze(0)), batched


def _concat_dmc(obs: Mapping, size: int) -> np.ndarray | Tensor:
    """A dm_control observation dict as one vector [F] (or [B, F]): its entries flattened
    in sorted key order, as ``make_env`` concatenates them."""
    parts = [obs[k] for k in sorted(obs)]
    if any(isinstance(p, Tensor) for p in parts):
        parts, cat = [torch.as_tensor(p) for p in parts], torch.cat
    else:
        parts, cat = [np.asarray(p) for p in parts], np.concatenate
    total = sum(int(np.prod(tuple(p.shape))) for p in parts)
    if total == size:
        return cat([p.reshape(-1) for p in parts])
    n = parts[0].shape[0] if parts[0].ndim else 0
    if n and all(p.ndim and p.shape[0] == n for p in parts) and total == size * n:
        return cat([p.reshape(n, -1) for p in parts], -1)
    raise ValueError(
        f"dm_control observation {sorted(obs)} has {total} values; the policy reads "
        f"{size} per step (one 'observation' vector) or {size} per row of a batch"
    )


# ---- loading --------------------------------------------------------------------------


def load_policy(
    source: str | Path, device: str | torch.device = "cpu", compile: bool = False
) -> Policy:
    """The policy of a trained agent, from ``source``: a checkpoint dir, run dir or
    state.pt (``make train`` writes them), an MLflow run id (its run dir's latest
    checkpoint, else the run's logged model), a logged MLflow model's dir, or a
    ``models:/<name>/<version>`` / ``runs:/<run id>/policy`` URI (MLflow looks them up in
    ``$MLFLOW_TRACKING_URI``, else the default store).

    Raises :class:`~dreamer_trl.checkpoint.CheckpointError` (one line) when ``source``
    holds no such thing.
    """
    state, where = read_policy_source(str(source))
    policy = policy_from_state(state, where, torch.device(device))
    return policy.compile() if compile else policy


def read_policy_source(source: str) -> tuple[dict, str]:
    """(checkpoint state, where it was found) for anything :func:`load_policy` takes."""
    if source.startswith(("models:/", "runs:/")):
        return _from_mlflow(source), source
    path = Path(source).expanduser()
    if path.exists() or not is_run_id(source):
        where = _local_checkpoint(path)
        return load_checkpoint(where, map_location="cpu"), str(where)
    from .tracking import run_dir_of

    run_dir = run_dir_of(source)
    if run_dir is not None and Path(run_dir).exists():
        where = find_checkpoint(run_dir)
        return load_checkpoint(where, map_location="cpu"), str(where)
    uri = f"runs:/{source}/{MLFLOW_MODEL}"
    try:
        return _from_mlflow(uri), uri
    except CheckpointError:
        raise CheckpointError(
            f"{source!r} is neither a path nor an MLflow run id with a run dir here or a "
            f"logged policy model ({uri}); MLFLOW_TRACKING_URI names the store"
        ) from None


def _local_checkpoint(path: Path) -> Path:
    """The checkpoint dir for a local path; CheckpointError names what was expected."""
    if path.is_file() and path.suffix in EXPORT_SUFFIXES:
        raise CheckpointError(
            f"{path} is {EXPORT_SUFFIXES[path.suffix]} export, not a checkpoint (run it with "
            f"its runtime: dreamer_trl/onnx_policy.py for ONNX); load_policy takes {_SOURCES}"
        )
    if path.is_dir() and (path / "MLmodel").is_file():  # a downloaded MLflow model
        return find_checkpoint(path / "artifacts" / MLFLOW_CHECKPOINT)
    return find_checkpoint(path)


def _from_mlflow(uri: str) -> dict:
    """The state of the policy file inside an MLflow model (downloaded, read into memory)."""
    from mlflow.artifacts import download_artifacts

    # A library call: no download progress bar on the user's screen.
    with tempfile.TemporaryDirectory(prefix="dreamer_policy_") as tmp, temporary_env(
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"
    ):
        try:
            local = download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as err:  # MlflowException, OSError, a store that is not there
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"no MLflow model at {uri}: {first}") from None
        return load_checkpoint(_local_checkpoint(Path(local)), map_location="cpu")


@contextlib.contextmanager
def temporary_env(**values: str | None) -> Iterator[None]:
    """Environment variables set (None: unset) for the block, then as they were."""
    before = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in before.items():
            _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def policy_from_state(state: Mapping, source: str, device: torch.device) -> Policy:
    """A Policy from a training checkpoint's state (``agent`` weights and ``config``) or a
    policy file's (``policy`` weights, ``config`` and the spaces, see :func:`policy_state`)."""
    cfg = state.get("config")
    if not isinstance(cfg, Mapping) or not ("agent" in state or "policy" in state):
        keys = sorted(state)[:8]
        raise CheckpointError(
            f"{source} is not a dreamer_trl checkpoint: its state holds {keys}, expected "
            "'config' with 'agent' weights (make train) or 'policy' weights (an MLflow model)"
        )
    if "policy" in state:
        agent = _build_agent(cfg, _obs_space(state["obs_space"]), state["action_space"])
        space = ActionSpace(**state["action_space"])
        _load(agent.world_model, state["policy"]["world_model"], source)
        _load(agent.actor, state["policy"]["actor"], source)
    else:
        agent, space = _agent_from_env(cfg)
        _load(agent, state["agent"], source)
    steps = int((state.get("counters") or {}).get("env_steps", 0))
    agent.to(device)
    return Policy(agent.world_model, agent.actor, agent.obs_space, space, cfg, steps, source)


def _agent_from_env(cfg: Mapping) -> tuple[DreamerV3Agent, ActionSpace]:
    """The agent the config builds (as training built it, from its env's specs), untrained."""
    from .envs import make_env

    env = make_env(cfg["env"], int(cfg.get("seed", 0)))
    try:
        agent = DreamerV3Agent.from_specs(
            env.observation_spec,
            env.action_spec,
            cfg["model"],
            _acting_algo(cfg),
            cfg["env"].get("obs_keys"),
        )
        return agent, ActionSpace.from_env(env)
    finally:
        env.close()


def _build_agent(cfg: Mapping, obs_space: ObsSpace, action: Mapping) -> DreamerV3Agent:
    return DreamerV3Agent(
        obs_space, int(action["dim"]), bool(action["discrete"]), cfg["model"], _acting_algo(cfg)
    )


def _acting_algo(cfg: Mapping) -> dict:
    # The training compute dtype changes no weight; "auto" would probe the device and print.
    return {**dict(cfg.get("algo") or {}), "imag_dtype": "float32"}


def _load(module: nn.Module, weights: Mapping, source: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: weights do not fit the agent its config builds: "
            f"{str(err).splitlines()[0]}"
        ) from None


def _obs_space(stored: Mapping) -> ObsSpace:
    ints = stored["integers"]
    integers = {k: IntVector(tuple(v["low"]), tuple(v["classes"])) for k, v in ints.items()}
    images = {k: tuple(v) for k, v in stored["images"].items()}
    return ObsSpace(dict(stored["vectors"]), images, integers)


def policy_state(policy: Policy) -> dict:
    """What a policy file holds: the acting weights (world model and actor), the config
    and both spaces, so it loads without building the env. ``save_checkpoint`` writes it."""
    space = policy.obs_space
    return {
        "kind": POLICY_KIND,
        "policy": {
            "world_model": policy.world_model.state_dict(),
            "actor": policy.actor.state_dict(),
        },
        "config": policy.config,
        "obs_space": {
            "vectors": dict(space.vectors),
            "images": {k: list(v) for k, v in space.images.items()},
            "integers": {k: asdict(v) for k, v in space.integers.items()},
        },
        "action_space": asdict(policy.action_space),
        "counters": {"env_steps": policy.env_steps},
        "meta": {"obs_keys": policy.obs_keys, "source": policy.source},
    }
