"""The acting envs' state across a checkpoint, so a resumed run continues its episodes.

Without it every resume starts each env on a new episode: a walker-walk episode is 1000
steps an env, 16k env steps for the reference's 16 envs, and a run resumed every few
thousand steps never finishes one (its replay holds cut episodes, its log no training
return). Saved: each env's simulator state and the collector's carried step (the last
observation, the acting latents ``deter`` / ``stoch`` / ``prev_action``, ``step_count``,
``episode_reward``, ``is_init``), which TorchRL's transforms keep in the tensordict.

Supported where the simulator state can be read and written in place, in an in-process
collector (one worker: one env, a ``SerialEnv``, or a ``ParallelEnv`` of
:class:`ActingEnv`, whose workers read and write their envs' state on a method call):
suite ``dmc`` (MuJoCo's integration state, the episode's step count, the task's random
state), ``atari`` (ALE's emulator state with its RNG), ``crafter`` and gymnasium's
classic-control and toy-text envs (their attributes), each with its gymnasium wrappers'
attributes (step limits, frame buffers); and suite ``torchrl``'s natively batched
``PendulumEnv``, whose N states ride in the carried step and whose own state is the
generator that draws its resets. Elsewhere (Brax's batched envs, say) :func:`acting_state`
says why not, and a resume starts new episodes.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.collectors import BaseCollector, Collector
from torchrl.envs import EnvBase, ParallelEnv, PendulumEnv, SerialEnv, TransformedEnv
from torchrl.envs.libs.dm_control import DMControlWrapper
from torchrl.envs.libs.gym import GymWrapper

from .envs import CrafterEnv

FORMAT = 1  # of the saved dict; a checkpoint with another starts new episodes


class ActingEnv(TransformedEnv):
    """An acting env (``collection.acting_env``) of replay stream ``stream``, its simulator
    state reachable by method: a ``ParallelEnv`` runs a method call on each worker's env,
    so these read and write the state in the worker process that steps it."""

    stream: int = 0

    def sim_state(self) -> tuple[dict | None, str]:
        return sim_state(self)

    def load_sim_state(self, states: Mapping[int, dict]) -> None:
        """Load this env's entry of ``states`` (replay stream -> state)."""
        load_sim_state(self, states[self.stream])


def acting_state(collector: BaseCollector | None) -> tuple[dict | None, str]:
    """(state, "") of ``collector``'s envs and carried step, or (None, why it is not
    saved). The state holds numpy arrays and plain Python: checkpoints pickle it."""
    env, why = _acting_env(collector)
    if env is None:
        return None, why
    # A ParallelEnv answers one (state, why) for each worker, in sub-env order.
    got = env.sim_state() if isinstance(env, ParallelEnv) else [
        sim_state(sub) for sub in _in_process_envs(env)
    ]
    sims = []
    for sim, why in got:
        if sim is None:
            return None, why
        sims.append(sim)
    # A copy: a SerialEnv writes each step into the same buffers.
    carrier = collector._carrier.exclude("collector").clone().cpu().to_dict()
    return {"format": FORMAT, "envs": sims, "carrier": carrier}, ""


def restore_acting(collector: BaseCollector, state: dict | None) -> str:
    """Put ``state`` (from :func:`acting_state`) back into a new ``collector`` of the same
    config (a ``SerialEnv`` and a ``ParallelEnv`` of it hold the same state); returns ""
    once restored, else why the envs start new episodes."""
    if state is None:
        return "the checkpoint holds no env state (saved by older code, or before a batch)"
    if state.get("format") != FORMAT:
        return f"the checkpoint's env state has format {state.get('format')}, this code {FORMAT}"
    env, why = _acting_env(collector)
    if env is None:
        return why
    envs = env.batch_size.numel() if isinstance(env, SerialEnv | ParallelEnv) else 1
    if envs != len(state["envs"]):
        return f"the checkpoint has the state of {len(state['envs'])} envs, this run {envs}"
    carrier = collector._carrier
    # A natively batched env is one entry of "envs" whatever its batch: count its streams.
    saved_batch = state["carrier"]["done"].shape[:-1]
    if saved_batch != carrier.batch_size:
        return (f"the checkpoint's carried step has batch {tuple(saved_batch)}, "
                f"this run {tuple(carrier.batch_size)}")
    saved = TensorDict.from_dict(state["carrier"], batch_size=carrier.batch_size)
    missing = set(carrier.exclude("collector").keys(True, True)) - set(saved.keys(True, True))
    if missing:  # (it has more: the last action, which a fresh reset lacks)
        return f"the checkpoint's carried step lacks {sorted(map(str, missing))}"
    if isinstance(env, ParallelEnv):
        # Every worker gets the call: each loads the state of its own stream.
        streams = saved.get("stream").reshape(-1).tolist()
        env.load_sim_state(dict(zip(streams, state["envs"])))
    else:
        for sub, sim in zip(_in_process_envs(env), state["envs"]):
            load_sim_state(sub, sim)
    if "collector" in carrier.keys():  # the collector's own metadata (trajectory ids)
        saved.set("collector", carrier.get("collector"))
    collector._carrier = (
        saved.to(carrier.device) if carrier.device is not None else saved.clear_device_()
    )
    return ""


def _acting_env(collector: BaseCollector | None) -> tuple[EnvBase | None, str]:
    """``collector``'s env if this process can reach its simulators' state, else why not."""
    if not isinstance(collector, Collector):
        return None, "its envs run in worker processes (collector.num_workers > 1 or remote)"
    env = collector.env
    if isinstance(env, ParallelEnv):
        # A method its workers' envs lack would kill the workers: ask only ActingEnvs.
        if not all(_builds_acting_env(fn) for fn in env.create_env_fn):
            return None, "its ParallelEnv's envs are not ActingEnvs (collection.acting_env)"
        if env.is_closed:  # lazily started: nothing stepped yet
            return None, "its ParallelEnv has not started"
        return env, ""
    if isinstance(env, SerialEnv):
        if not getattr(env, "_envs", None):
            return None, "its SerialEnv has not started"
        return env, ""
    if isinstance(env, TransformedEnv) and (
        env.batch_size.numel() <= 1 or isinstance(env.base_env, PendulumEnv)
    ):
        return env, ""
    return None, f"its env is a {type(env).__name__} of batch {tuple(env.batch_size)}"


def _in_process_envs(env: EnvBase) -> list[EnvBase]:
    """The single envs of an in-process ``env``: a SerialEnv's, or ``env`` itself."""
    return list(env._envs) if isinstance(env, SerialEnv) else [env]


def _builds_acting_env(fn: Any) -> bool:
    from .collection import acting_env  # (collection imports this module)

    return isinstance(fn, functools.partial) and fn.func is acting_env


def sim_state(env: EnvBase) -> tuple[dict | None, str]:
    """(state, "") of one env's simulator, or (None, why it cannot be saved)."""
    base = env.base_env if isinstance(env, TransformedEnv) else env
    if isinstance(base, DMControlWrapper):
        return _dmc_state(base._env), ""
    if isinstance(base, GymWrapper):
        return _gym_state(base._env)
    if isinstance(base, PendulumEnv):  # θ, θ̇ and the physical params are in the carried step
        return {"suite": "torchrl", "rng": base.rng.get_state().numpy()}, ""
    return None, (f"the state of a {type(base).__name__} env is not saved (suites dmc, "
                  f"atari, crafter, gymnasium classic control / toy text, torchrl pendulum)")


def load_sim_state(env: EnvBase, state: dict) -> None:
    """Write ``state`` (from :func:`sim_state`) into ``env``'s simulator."""
    base = env.base_env if isinstance(env, TransformedEnv) else env
    if state["suite"] == "dmc":
        _load_dmc_state(base._env, state)
    elif state["suite"] == "torchrl":
        base.rng.set_state(torch.from_numpy(state["rng"]))
    else:
        _load_gym_state(base._env, state)


def _dmc_state(dm_env: Any) -> dict:
    """A dm_control ``Environment``'s state: MuJoCo's integration state (time, qpos, qvel,
    act, warm start, controls...), how far into its time limit the episode is, and the task's
    random state (it draws the next episode's initial pose)."""
    import mujoco

    physics = dm_env.physics
    which = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(physics.model.ptr, which))
    mujoco.mj_getState(physics.model.ptr, physics.data.ptr, state, which)
    return {
        "suite": "dmc",
        "integration": state,
        "step_count": int(dm_env._step_count),
        "reset_next_step": bool(dm_env._reset_next_step),
        "task_random": dm_env.task.random.get_state(),
    }


def _load_dmc_state(dm_env: Any, state: dict) -> None:
    import mujoco

    physics = dm_env.physics
    which = mujoco.mjtState.mjSTATE_INTEGRATION
    mujoco.mj_setState(physics.model.ptr, physics.data.ptr, state["integration"], which)
    physics.forward()  # the derived quantities (positions, sensors) of the restored state
    dm_env._step_count = state["step_count"]
    dm_env._reset_next_step = state["reset_next_step"]
    dm_env.task.random.set_state(state["task_random"])


def _gym_layers(env: gym.Env) -> tuple[list[gym.Wrapper], gym.Env]:
    """A gymnasium env's wrappers, outermost first, and the env they wrap."""
    wrappers = []
    while isinstance(env, gym.Wrapper):
        wrappers.append(env)
        env = env.env
    return wrappers, env


def _own_vars(obj: Any) -> dict:
    """An object's attributes less the envs it wraps (each layer saves its own)."""
    return {k: v for k, v in vars(obj).items() if not isinstance(v, gym.Env)}


def _gym_state(env: gym.Env) -> tuple[dict | None, str]:
    from ale_py.env import AtariEnv

    wrappers, core = _gym_layers(env)
    if isinstance(core, AtariEnv):
        # The emulator (frame counter, sticky-action RNG included) and the noop draws' RNG.
        sim = {"ale": core.clone_state(include_rng=True), "np_random": core.np_random}
    elif isinstance(core, CrafterEnv) or type(core).__module__.startswith(PLAIN_GYM):
        sim = {"vars": _own_vars(core)}  # pure Python and numpy: the attributes are the state
    else:
        return None, (f"the state of gym env {type(core).__name__} is not saved (atari, "
                      "crafter and gymnasium classic control / toy text are)")
    try:
        state = copy.deepcopy(
            {"suite": "gym", "wrappers": [_own_vars(w) for w in wrappers], "core": sim}
        )
    except (TypeError, copy.Error) as err:  # an open render window, say
        return None, f"the state of gym env {type(core).__name__} cannot be copied: {err}"
    return state, ""


PLAIN_GYM = ("gymnasium.envs.classic_control", "gymnasium.envs.toy_text")


def _load_gym_state(env: gym.Env, state: dict) -> None:
    wrappers, core = _gym_layers(env)
    state = copy.deepcopy(state)  # the checkpoint's copy stays as it was
    for wrapper, saved in zip(wrappers, state["wrappers"]):
        vars(wrapper).update(saved)
    if "ale" in state["core"]:
        core.restore_state(state["core"]["ale"])
        core._np_random = state["core"]["np_random"]
    else:
        vars(core).update(state["core"]["vars"])
