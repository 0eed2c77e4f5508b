"""Where experience comes from: acting envs (one, or N stepped as a batch with one
policy call per step, each sub-env its own replay stream) and the TorchRL collector that
steps them with the acting policy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.collectors import Collector, MultiAsyncCollector
from torchrl.data import Composite, Unbounded
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv, TensorDictPrimer, TransformedEnv

from . import device_envs
from .agent import DreamerV3Agent
from .envs import make_env
from .policy import ActingPolicy
from .transforms import IncomingReward


def make_policy(
    agent: DreamerV3Agent, action_spec, random: bool = False, compile: bool = False
) -> ActingPolicy:
    policy = ActingPolicy(
        agent.world_model, agent.actor, action_spec, agent.obs_space.keys, random=random
    )
    if compile:
        policy.compile()
    return policy


def acting_env(
    env_cfg: Mapping, seed: int, policy: ActingPolicy, render: bool = False, stream: int = 0,
    batch: int | None = None, device: str | torch.device = "cpu",
) -> EnvBase:
    """An env with the transforms acting needs: incoming reward, the recurrent primer and
    a constant ``stream`` id, so replay keeps each worker's steps one stream of its own.
    ``batch=N``: one natively batched env [N] (suite ``torchrl``) on ``device``, env j
    being stream ``stream + j``."""
    env = make_env(env_cfg, seed, device, render=render, batch=batch)
    env = env if isinstance(env, TransformedEnv) else TransformedEnv(env)
    env.append_transform(IncomingReward())
    env.append_transform(policy.make_primer())
    ids = stream if batch is None else device_envs.stream_ids(stream, batch, env.device)
    env.append_transform(
        TensorDictPrimer(
            Composite(stream=Unbounded(shape=(), dtype=torch.int64)),
            default_value=ids,
            expand_specs=True,
        )
    )
    return env


def stream_of(batch: TensorDictBase) -> int:
    """The env stream a single-env collector batch [F] came from."""
    return int(batch.get("stream").reshape(-1)[0]) if "stream" in batch.keys() else 0


def env_streams(batch: TensorDictBase) -> list[tuple[int, TensorDictBase]]:
    """A collector batch as (stream, steps [F]) pairs: [F] from one env, [N, F] from a
    batched env of N (each sub-env its own stream, read from its ``stream`` entry)."""
    rows = batch.unbind(0) if batch.ndim == 2 else (batch,)
    return [(stream_of(row), row) for row in rows]


def batched_acting_env(
    env_cfg: Mapping, seed: int, policy: ActingPolicy, envs: int, first_stream: int,
    parallel: bool = False, device: str | torch.device = "cpu",
) -> EnvBase:
    """``envs`` acting envs stepped as one batch [envs] (one policy call per step): sub-env
    j is stream ``first_stream + j``. A natively batched suite (``torchrl``) is one env of
    batch [envs] on ``device``; any other is ``envs`` envs with seeds ``seed + j`` in a
    ``SerialEnv`` (this process: cheap envs, few cores) or ``ParallelEnv`` (a process each)."""
    if env_cfg["suite"] == "torchrl":
        return acting_env(env_cfg, seed, policy, stream=first_stream, batch=envs, device=device)
    fns = [
        functools.partial(acting_env, env_cfg, seed + j, policy, stream=first_stream + j)
        for j in range(envs)
    ]
    return (ParallelEnv if parallel else SerialEnv)(envs, fns)


def make_collector(cfg: DictConfig, policy: ActingPolicy, seed: int):
    """``Collector`` in this process, or ``MultiAsyncCollector`` over worker processes;
    each steps ``collector.envs`` envs (worker i's env j: stream and seed offset i·envs + j).
    The reference's ``run.envs`` is workers × envs."""
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    workers, envs = int(cfg.collector.num_workers), int(cfg.collector.get("envs", 1))
    parallel = bool(cfg.collector.get("parallel", False))
    if envs == 1 and env_cfg["suite"] != "torchrl":  # a plain env, as before batched envs
        fns = [
            functools.partial(acting_env, env_cfg, seed + i, policy, stream=i)
            for i in range(workers)
        ]
    else:
        fns = [
            functools.partial(
                batched_acting_env, env_cfg, seed + i * envs, policy, envs, i * envs, parallel,
                cfg.collector.device,
            )
            for i in range(workers)
        ]
    kwargs = dict(
        frames_per_batch=int(cfg.collector.frames_per_batch),
        total_frames=-1,
        device=cfg.collector.device,
        storing_device="cpu",
        split_trajs=False,
    )
    if workers == 1:
        return Collector(fns[0], policy, **kwargs)
    return MultiAsyncCollector(fns, policy, **kwargs)
