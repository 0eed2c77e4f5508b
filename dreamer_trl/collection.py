"""Where experience comes from: acting envs (one, or N stepped as a batch with one
policy call per step, each sub-env its own replay stream) and the TorchRL collector that
steps them with the acting policy.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import socket
import sys
import time
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torch.distributed import rpc
from torchrl.collectors import BaseCollector, Collector, MultiAsyncCollector
from torchrl.collectors.distributed import DistributedCollector, RPCCollector
from torchrl.data import Composite, Unbounded
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv, TensorDictPrimer

from . import device_envs
from .agent import DreamerV3Agent
from .env_state import ActingEnv
from .envs import NATIVELY_BATCHED, make_env
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
    ``batch=N``: one natively batched env [N] (suites ``torchrl``, ``brax``) on ``device``, env j
    being stream ``stream + j``. An :class:`ActingEnv`: a checkpoint can hold its state."""
    env = make_env(env_cfg, seed, device, render=render, batch=batch, env_class=ActingEnv)
    env.stream = stream
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
    j is stream ``first_stream + j``. A natively batched suite (``torchrl``, ``brax``) is one env of
    batch [envs] on ``device``; any other is ``envs`` envs with seeds ``seed + j`` in a
    ``SerialEnv`` (this process: cheap envs, few cores) or ``ParallelEnv`` (a process each)."""
    if env_cfg["suite"] in NATIVELY_BATCHED:
        return acting_env(env_cfg, seed, policy, stream=first_stream, batch=envs, device=device)
    fns = [
        functools.partial(acting_env, env_cfg, seed + j, policy, stream=first_stream + j)
        for j in range(envs)
    ]
    return (ParallelEnv if parallel else SerialEnv)(envs, fns)


BACKENDS = ("local", "distributed", "rpc", "ray")  # collector.backend (config_schema repeats it)


def env_makers(cfg: DictConfig, policy: ActingPolicy, seed: int) -> list:
    """One env constructor per collector worker: worker i steps ``collector.envs`` envs,
    its env j being stream and seed offset i·envs + j (the same for every backend)."""
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    workers, envs = int(cfg.collector.num_workers), int(cfg.collector.get("envs", 1))
    parallel = bool(cfg.collector.get("parallel", False))
    if envs == 1 and env_cfg["suite"] not in NATIVELY_BATCHED:  # a plain env (no batch)
        return [
            functools.partial(acting_env, env_cfg, seed + i, policy, stream=i)
            for i in range(workers)
        ]
    return [
        functools.partial(
            batched_acting_env, env_cfg, seed + i * envs, policy, envs, i * envs, parallel,
            cfg.collector.device,
        )
        for i in range(workers)
    ]


def make_collector(cfg: DictConfig, policy: ActingPolicy, seed: int) -> BaseCollector:
    """The collector ``collector.backend`` names, over ``collector.num_workers`` workers that
    each step ``collector.envs`` envs (worker i's env j: stream and seed offset i·envs + j;
    the reference's ``run.envs`` is workers × envs). ``local``: ``Collector`` in this
    process, or ``MultiAsyncCollector`` over worker processes; ``distributed`` / ``rpc`` /
    ``ray``: TorchRL's remote collectors (:func:`remote_collector`). Every backend yields
    one worker's batch at a time, [F] or [envs, F/envs], each row tagged with its stream."""
    backend = str(cfg.collector.get("backend", "local"))
    fns = env_makers(cfg, policy, seed)
    kwargs = dict(
        frames_per_batch=int(cfg.collector.frames_per_batch),
        total_frames=-1,
        device=cfg.collector.device,
        storing_device="cpu",
        split_trajs=False,
    )
    if backend != "local":
        return remote_collector(backend, fns, policy, **kwargs)
    if len(fns) == 1:
        return Collector(fns[0], policy, **kwargs)
    return MultiAsyncCollector(fns, policy, **kwargs)


def remote_collector(backend: str, fns: list, policy: ActingPolicy, **kwargs) -> BaseCollector:
    """A TorchRL remote collector with one worker per env constructor in ``fns``, each
    running a plain ``Collector`` over its envs; launched on this machine (``mp``) for
    ``distributed`` and ``rpc``, on the Ray cluster ``ray.init`` finds for ``ray``.

    Asynchronous (``sync=False``): every batch is one worker's [F] or [envs, F/envs], the
    shape the local collectors yield, so ``env_streams`` and replay see no difference, and
    a slow worker never stalls the others. The policy weights (its ``_random`` buffer too)
    reach the workers through TorchRL's weight sync scheme on ``update_policy_weights_()``.
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"collector.backend={backend} is invalid: must be one of "
                         f"{', '.join(BACKENDS)}")
    # One torch thread a worker, as TorchRL's local multi-process collectors set theirs
    # (num_sub_threads=1): its remote ones leave torch's default, and workers that step
    # their envs all the time with a thread per core starve the learner's update.
    fns = [functools.partial(_one_thread, fn) for fn in fns]
    # total_frames=-1 (endless) makes the remote collectors' iterators yield nothing in
    # torchrl 0.14.1 (they loop while frames < total_frames): endless is a huge count there.
    kwargs["total_frames"] = sys.maxsize
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ModuleNotFoundError:
            raise RuntimeError(
                "collector.backend=ray needs ray, which is not installed (pip install ray); "
                "collector.backend=distributed runs the same workers on this machine"
            ) from None
        from torchrl.collectors.distributed import RayCollector

        return RayCollector(
            fns, policy, collector_class=Collector, collector_kwargs=[
                {"device": kwargs["device"], "storing_device": kwargs["storing_device"]}
            ] * len(fns), num_collectors=len(fns), sync=False,
            frames_per_batch=kwargs["frames_per_batch"], total_frames=kwargs["total_frames"],
            split_trajs=False,
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Both collectors make this process rank 0 of a new default process group.
        raise RuntimeError(
            f"collector.backend={backend} cannot run in a torch.distributed learner "
            "(torchrun): TorchRL's remote collector needs the default process group for "
            "its own workers; use collector.backend=local there"
        )
    if any(p.device.type != "cpu" for p in policy.parameters()):
        raise RuntimeError(
            f"collector.backend={backend} needs the learner on device=cpu: gloo sends the "
            "policy weights to the workers from host memory only"
        )
    if backend == "rpc":
        return RPCEnvWorkers(
            fns, policy, collector_class=Collector, sync=False, backend="gloo", launcher="mp",
            tcp_port=free_port(), **kwargs,
        )
    return EnvWorkers(
        fns, policy, collector_class=Collector, sync=False, backend="gloo", launcher="mp",
        tcp_port=free_port(), **kwargs,
    )


class EnvWorkers(DistributedCollector):
    """TorchRL's ``DistributedCollector`` (async, ``mp`` launcher) with the two things a
    training run needs that it lacks in torchrl 0.14.1: a dead worker raises instead of
    hanging the learner (its async loop polls the worker's status key forever), and
    ``shutdown`` always leaves no worker process and no process group behind (a failing
    shutdown used to keep both, and the next collector in the process could not start).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._store = _WatchedStore(self._store, self.jobs)

    def _next_async(self, total_frames, trackers):
        # A worker's death can also surface first as gloo's "Connection reset by peer" from
        # the batch receive, before a status poll sees the process gone.
        try:
            return super()._next_async(total_frames, trackers)
        except RuntimeError as err:
            error = dead_worker_error(self.jobs, grace=2.0)
            if error is None or err is error:
                raise
            raise error from None

    def _init_worker_dist_mp(self, i: int):
        # The mp launcher hands the policy to the worker as a process argument, which
        # torch's multiprocessing pickler shares: the learner's parameters move to shared
        # memory and the worker reads them mid-update, bypassing the gloo weight pushes (the
        # path a worker on another machine has). A by-value copy keeps the pushes the only
        # way weights arrive, as for the rpc and ray backends.
        policy = self._policy_to_send
        self._policy_to_send = _ByValue(policy) if policy is not None else None
        try:
            return super()._init_worker_dist_mp(i)
        finally:
            self._policy_to_send = policy

    def shutdown(self, timeout: float | None = None) -> None:
        if getattr(self, "_shutdown", False):
            return
        store = self._store
        try:
            for rank, job in enumerate(self.jobs, 1):
                if not job.is_alive():  # nobody will answer: don't wait the store timeout
                    store.set(f"NODE_{rank}_out", b"down")
            for scheme in (self._weight_sync_schemes or {}).values():
                # Each worker's weight-receiver thread waits on its key; "stop" ends it now
                # (else the worker waits 5 s to join it before exiting).
                scheme._send_instruction("stop")
            self._store = store.store  # the plain store: shutdown's own waits must not raise
            super().shutdown(timeout)
        except torch.distributed.DistStoreError:
            # A worker still in a long batch (or signalled along with us) does not answer
            # within the store's 10 s; it is stopped below, and raising here would hide why
            # the run is stopping (a Ctrl-C would end as a crash).
            pass
        finally:
            _stop(self.jobs)
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


class _ByValue:
    """An object that pickles by value (a plain pickle inside), whatever the pickler."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __reduce__(self):
        return pickle.loads, (pickle.dumps(self.obj),)


POLL_PAUSE = 0.002  # seconds between two polls of a worker's status (_WatchedStore)


class _WatchedStore:
    """The collector's TCPStore; reading a worker's status first checks every worker
    process is alive, so the async collection loop fails (one line) when one died."""

    def __init__(self, store, jobs: list) -> None:
        self.store, self.jobs = store, jobs

    def get(self, key: str) -> bytes:
        if key.endswith("_status"):
            error = dead_worker_error(self.jobs)
            if error is not None:
                raise error
            # The async loop polls the workers' status keys back to back, a TCP round trip
            # each; unthrottled it keeps a core busy that the workers need (on 2 cores, 10
            # batches took 2.3 s polling flat out and 0.6 s with a 2 ms pause a poll).
            time.sleep(POLL_PAUSE)
        return self.store.get(key)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


class RPCEnvWorkers(RPCCollector):
    """TorchRL's ``RPCCollector`` (async, ``mp`` launcher) hardened like
    :class:`EnvWorkers`. In torchrl 0.14.1 a dead worker surfaces as TensorPipe's bare
    "EOF: end of file" from ``next()``, and ``shutdown`` then raises the same error on the
    dead worker's future before stopping anyone, leaving the other workers running and
    this process's RPC agent up (so no later RPC collector could start in it)."""

    def _next_async_rpc(self):
        try:
            return super()._next_async_rpc()
        except RuntimeError:
            error = dead_worker_error(self.jobs, grace=2.0)
            if error is None:
                raise
            raise error from None

    def shutdown(self, timeout: float | None = None) -> None:
        if getattr(self, "_shutdown", True):  # never started, or already shut down
            return
        try:
            if dead_worker_error(self.jobs) is None:
                super().shutdown(timeout)
        except RuntimeError:
            pass  # as in EnvWorkers.shutdown: the workers are stopped below
        finally:
            if not self._shutdown:  # a worker died, or the graceful shutdown failed
                self._shutdown = True
                _stop(self.jobs)
                # Not graceful: a graceful RPC shutdown waits for every peer, dead ones too.
                rpc.shutdown(graceful=False)
                for scheme in (self._weight_sync_schemes or {}).values():
                    scheme.shutdown()
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()


def _one_thread(make_env):
    """``make_env()``, in a remote worker after setting its process to one torch thread
    (where the learner's process calls it, say for specs, its threads stay as they are)."""
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)
    return make_env()


def dead_worker_error(jobs: list, grace: float = 0.0) -> RuntimeError | None:
    """The one-line error for the first of ``jobs`` (worker processes) that exited, or
    None while all run. ``grace``: seconds to wait for one to exit, for a caller that saw
    a broken connection, which can come a moment before the process is reaped."""
    deadline = time.monotonic() + grace
    while True:
        for i, job in enumerate(jobs):
            if not job.is_alive():
                return RuntimeError(
                    f"remote env worker {i} (pid {job.pid}) exited with code {job.exitcode}; "
                    "its log is above"
                )
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _stop(jobs: list) -> None:
    for job in jobs:
        job.join(timeout=5)
        if job.is_alive():
            job.terminate()
            job.join(timeout=5)


def free_port() -> int:
    """A TCP port free now, for a remote collector's rendezvous (``tcp_port``): TorchRL's
    default is a fixed 10003, and the rendezvous does not retry, so concurrent runs and
    tests on one machine would collide. (Its TCPStore takes 10004 or, retrying, another.)"""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]
