"""The training loop, top to bottom: collect → store steps → update at the train ratio
→ log, evaluate, checkpoint. Factories build each piece from the config.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm import tqdm

from .agent import DreamerV3Agent
from .cadence import Cadence, Means, Phases, log_line, shown_return
from .checkpoint import (
    CheckpointError,
    DiskFullError,
    capture_rng,
    expected_bytes,
    find_checkpoint,
    load_checkpoint,
    load_replay,
    restore_rng,
    save_checkpoint,
    verified_checkpoint,
)
from .collection import acting_env, env_streams, make_collector, make_policy
from .distributed import SINGLE, World, all_true, barrier, broadcast_object, init_world
from .env_state import acting_state, restore_acting
from .envs import make_env
from .learner import make_prefetch, update_step
from .offline import heldout_loss
from .precision import resolve_dtype
from .replay import StepReplay
from .report import open_loop_video
from .runtime import keep_freed_memory
from .tracking import Tracker, flatten_config

# Batches (B x T+1 each) the held-out world-model losses average at each log.
HELDOUT_BATCHES = 4


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name} but torch {torch.__version__} sees no CUDA device; valid here: "
            "device=cpu or device=auto"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            valid = ", ".join(f"cuda:{i}" for i in range(count))
            raise ValueError(f"device={name} does not exist: {count} CUDA device(s); valid: "
                             f"{valid}, cuda, cpu")
    return device


def make_agent(cfg: DictConfig, env: EnvBase, device: torch.device) -> DreamerV3Agent:
    algo = OmegaConf.to_container(cfg.algo, resolve=True)
    if algo.get("imag_dtype", "auto") == "auto":
        algo["imag_dtype"] = resolve_dtype("auto", device)
        print(f"algo.imag_dtype=auto: {algo['imag_dtype']} on {device} "
              f"({'native' if algo['imag_dtype'] == 'bfloat16' else 'no'} bf16 units)", flush=True)
    agent = DreamerV3Agent.from_specs(
        env.observation_spec, env.action_spec, cfg.model, algo, cfg.env.get("obs_keys")
    )
    return agent.to(device)


class Trainer:
    """Owns the agent, replay, collector, tracker and counters of one run.

    In a data-parallel job (``world``: ``torchrun``, see :mod:`dreamer_trl.distributed`)
    one Trainer runs on each rank with its own envs, seeds and replay; the agents stay one
    (their updates average gradients). Rank 0 evaluates, logs and owns ``run_dir``'s
    checkpoints; rank r keeps its replay's in ``run_dir/rank<r>``, written at the same steps.
    """

    # Non-finite guard: the one-line report once an update's losses or gradients were found
    # NaN/inf (see check_finite); a poisoned run is stopped and never checkpointed again.
    poisoned: str | None = None
    last_return = float("nan")  # the latest finished training episode's return (log line)

    def __init__(self, cfg: DictConfig, run_dir: str | Path, world: World = SINGLE):
        self.cfg, self.run_dir, self.world = cfg, Path(run_dir), world
        check_world(cfg, world)
        # Rank r's own checkpoints and replay scratch: rank 0's are the run's.
        self.own_dir = self.run_dir if world.main else self.run_dir / f"rank{world.rank}"
        self.device = init_world(world, resolve_device(cfg.device))
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        torch.set_float32_matmul_precision(str(cfg.get("matmul_precision", "highest")))
        keep_freed_memory()
        # Each rank draws its own noise (acting, replay sampling, imagination); the agents
        # start from rank 0's weights all the same (data_parallel below).
        torch.manual_seed(cfg.seed + world.rank)
        np.random.seed(cfg.seed + world.rank)
        probe = make_env(cfg.env, cfg.seed)
        self.agent = make_agent(cfg, probe, self.device)
        self.agent.data_parallel(world)
        self.action_spec = probe.action_spec
        probe.close()
        if cfg.compile.enabled:
            self.agent.compile(mode=cfg.compile.mode)
        elif cfg.compile.get("steps", True):  # configs saved before the key: the default
            chunk = int(cfg.compile.get("observe_chunk", 4))  # likewise
            self.agent.compile_steps(observe_chunk=chunk, mode=cfg.compile.mode)
        # Opened (and checked against the agent) before anything is written: a bad dataset
        # is one line and leaves no run dir.
        self.dataset = open_stored_experience(cfg, self.agent, world)
        # The first write under run_dir, and it creates run_dir: only once the env and the
        # agent are built, so a bad env id or model config leaves no (empty) run dir behind.
        self.scratch = fresh_scratch_dir(self.own_dir)
        self.replay = self.make_replay(replay_capacity(cfg, self.dataset))
        self.heldout: StepReplay | None = None  # train.heldout_every's episodes (train())
        self.heldout_every = int(cfg.train.get("heldout_every", 0))  # older configs: none
        self.prefetch = make_prefetch(str(cfg.replay.get("prefetch", "auto")), self.replay,
                                      self.device)
        self.counters = {
            "env_steps": 0,
            "updates": 0,
            "episodes": 0,
            "updates_due": 0.0,
            "wall_seconds": 0.0,
            "dataset_steps": 0,  # steps train.dataset put into replay (once per run)
            "pretrained": 0,  # of train.pretrain's updates
        }
        self.offline = bool(cfg.train.get("offline", False))
        self._clock = None  # (time.time() at train start, wall_seconds then)
        self.phases = Phases()
        self.mlflow_run_id: str | None = None
        self.commit = _git_commit()  # of the code that started the run (kept on resume)
        self.returns: list[tuple[int, float]] = []  # (env step, eval return)
        # The acting envs' state (env_state.py) as of the last batch in replay: what a
        # checkpoint holds, so the steps a stop cuts short of a batch are lost from both.
        self.acting: dict | None = None
        self.resumed = False  # from a checkpoint (load): train() restores its envs' state

    # ---- checkpoints ---------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "model": self.cfg.model.name,
            "env": self.cfg.env.name,
            "obs_keys": list(self.agent.obs_space.keys),
            "action_dim": self.agent.action_dim,
            "discrete": self.agent.discrete,
            "params": self.agent.num_params(),
        }

    def state(self) -> dict:
        if self._clock:
            self.counters["wall_seconds"] = self._clock[1] + time.time() - self._clock[0]
        return {
            "agent": self.agent.state_dict(),
            "optimizer": self.agent.optimizer.state_dict(),
            "counters": dict(self.counters),
            "replay": self.replay.state_dict(),
            "rng": capture_rng(),
            "meta": {**self.meta(), "world_size": self.world.size},
            "mlflow_run_id": self.mlflow_run_id,
            "eval_returns": list(self.returns),
            "last_return": self.last_return,
            "acting": self.acting,
            "commit": self.commit,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self) -> Path:
        """Checkpoint the run. Data-parallel: every rank r > 0 writes its own (replay, rng,
        counters) first, then rank 0 the run's, so rank 0's latest is a step every rank
        holds (ranks > 0 keep one more checkpoint than rank 0 for the moment in between)."""
        keep = int(self.cfg.train.keep_checkpoints)
        if not self.world.main:
            path = save_checkpoint(
                self.own_dir, self.state(), replay_buffer=self.replay, keep=keep + 1,
                step=self.step(),
            )
        barrier(self.world)
        if self.world.main:
            path = save_checkpoint(
                self.run_dir, self.state(), replay_buffer=self.replay, keep=keep,
                step=self.step(),
            )
        return path

    def step(self) -> int:
        """The run's x axis (metrics, evals, checkpoint names, cadences): env steps, or
        updates in an offline run, whose env steps stay 0."""
        return self.counters["updates" if self.offline else "env_steps"]

    def check_disk(self) -> None:
        """Stop (DiskFullError, one line) while the disk still holds the next checkpoint
        and the replay's growth until then: a sparse memmap that cannot grow kills the
        process with SIGBUS and no message, and a checkpoint that cannot be written is lost
        work. The latest checkpoint stays the one to resume from."""
        t = self.cfg.train
        steps = max(int(t.checkpoint_every or 0), int(t.log_every))
        growth = 2 * steps * self.replay.bytes_per_step()  # at most 2 rows per env step
        need = expected_bytes(self.state(), self.replay) + growth
        free = shutil.disk_usage(self.own_dir).free
        if free < need:
            ckpts = self.own_dir / "checkpoints"
            latest = find_checkpoint(ckpts).name if (ckpts / "latest").is_file() else "none"
            raise DiskFullError(
                f"disk nearly full: {self.own_dir} has {free / 2**20:,.1f} MiB free, the next "
                f"checkpoint and the replay's growth until then need about "
                f"{need / 2**20:,.1f} MiB; stopping at env step {self.counters['env_steps']} "
                f"(latest checkpoint: {latest})"
            )

    def make_replay(self, capacity: int) -> StepReplay:
        cfg, t = self.cfg, self.cfg.train
        return StepReplay(
            capacity,
            t.batch_size,
            t.seq_len + 1,
            self.agent.obs_space.keys,
            cfg.replay.storage,
            str(self.scratch),
            cfg.replay.device,
            online=bool(cfg.replay.online),
            latent_dtype=cfg.replay.get("latent_dtype", "float32"),  # older configs: float32
        )

    def make_heldout(self) -> StepReplay | None:
        """The replay of train.heldout_every's held-out episodes (never trained on, not
        checkpointed: refilled from the dataset on resume), or None. Memmap in host memory
        whatever replay.storage is: a validation set needs no fast path. Made after any
        resume: the live replay's scratch dir must be empty when a dump is loaded into it."""
        if self.dataset is None or not self.heldout_every or not self.world.main:
            return None  # rank 0 validates (on every held-out episode), the others train
        t = self.cfg.train
        return StepReplay(
            self.dataset.size, t.batch_size, t.seq_len + 1, self.agent.obs_space.keys,
            "memmap", str(self.scratch / "heldout"), "cpu", online=False,
            latent_dtype=self.cfg.replay.get("latent_dtype", "float32"),
        )

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint (verified first; ``resume_fallback=true`` lets a
        damaged latest one give way to the previous one)."""
        ckpt = self._own_checkpoint(path)
        # Loaded to the host: load_state_dict copies weights onto the model's device and
        # the optimiser puts its state by its own rules (Adam's step counters stay on the
        # CPU; mapped onto a GPU, every update would read them back with a sync).
        state = load_checkpoint(ckpt, expected_meta=self.meta(), map_location="cpu", verify=False)
        saved_world = int(state["meta"].get("world_size", 1))
        if saved_world != self.world.size:  # the other ranks' replays would be lost or missing
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {saved_world} data-parallel process(es), "
                f"this run has {self.world.size}: resume with NPROC={saved_world}"
            )
        # The buffer is restored at the size it was saved with (checkpoints written
        # before capacities were recorded used the configured one).
        capacity = int(state["replay"].get("capacity", self.cfg.replay.capacity))
        if capacity != self.replay.capacity:
            self.replay = self.make_replay(capacity)
            if self.prefetch is not None:
                self.prefetch.replay = self.replay
        load_replay(ckpt, self.replay)
        self.agent.load_state_dict(state["agent"])
        self.agent.optimizer.load_state_dict(state["optimizer"])
        self.counters.update(state["counters"])
        self.replay.load_state_dict(state["replay"])
        restore_rng(state["rng"])
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.commit = state.get("commit", "unrecorded")
        self.returns = [tuple(x) for x in state.get("eval_returns", [])]
        # The log line's return until the next episode ends (which, 16 envs of 1000-step
        # episodes, is 16k steps after a resume); older checkpoints lack it.
        self.last_return = float(state.get("last_return", float("nan")))
        self.acting = state.get("acting")  # older checkpoints: none
        self.resumed = True

    def _own_checkpoint(self, path: str | Path) -> Path:
        """The checkpoint this rank resumes from: rank 0's (verified, see :meth:`load`),
        and on rank r the same step of its own."""
        ckpt = None
        if self.world.main:
            fallback = bool(self.cfg.get("resume_fallback"))
            ckpt = verified_checkpoint(str(path), fallback=fallback)
        name = broadcast_object(None if ckpt is None else ckpt.name, self.world)
        if self.world.main:
            return ckpt
        own = self.own_dir / "checkpoints" / name
        if not own.is_dir():
            raise CheckpointError(
                f"rank {self.world.rank} has no {own} for rank 0's checkpoint {name}: "
                f"every rank's part is needed to resume"
            )
        return verified_checkpoint(own)

    # ---- one training step -----------------------------------------------------------
    def update(self, ahead: bool = False) -> TensorDictBase:
        """One learner step; ``ahead``: another follows before the next extend (so the
        prefetch, when on, may draw its batch now)."""
        out = update_step(
            self.agent, self.replay, self.device, self.phases, self.prefetch, ahead
        )
        self.counters["updates"] += 1
        return out

    def ready(self) -> bool:
        """Replay holds train_start steps and a stream of T+1 (with N envs, train_start
        steps may be spread so thin that no stream holds T+1 yet) — on every rank, so that
        data-parallel ranks start updating (and so all-reducing) together."""
        ready = len(self.replay) >= self.cfg.train.train_start and self.replay.can_sample()
        return all_true(ready, self.world)

    def updates_for(self, new_steps: int) -> int:
        """Updates owed after ``new_steps`` more env steps: train_ratio / (B·T) per step."""
        t = self.cfg.train
        if not self.ready():
            return 0
        self.counters["updates_due"] += new_steps * t.train_ratio / (t.batch_size * t.seq_len)
        due = math.floor(self.counters["updates_due"])
        self.counters["updates_due"] -= due
        return due

    # ---- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, episodes: int, video: bool = False) -> tuple[dict, np.ndarray | None]:
        """Run ``episodes`` eval episodes; return their metrics and, with ``video``, frames.

        Frames: the first episode as uint8 [T, C, H, W] numpy from ``"render"`` (every suite
        renders, see ``make_env``), else ``"pixels"``, final observation included, at most
        ``eval.video_max_steps``. Rendering stops after that episode. Per-episode returns and
        lengths are kept in ``self.last_eval``.
        """
        env_cfg = OmegaConf.to_container(self.cfg.env, resolve=True)
        policy = make_policy(self.agent, self.action_spec, compile=bool(self.cfg.compile.policy))
        env = acting_env(env_cfg, int(self.cfg.seed) + 10_000, policy, render=video)
        mode = ExplorationType.DETERMINISTIC if self.cfg.eval.greedy else ExplorationType.RANDOM
        returns, lengths, frames = [], [], None
        with set_exploration_type(mode):
            for i in range(episodes):
                # The env steps on its device (CPU for simulators), the policy on the
                # model's: rollout moves each step between them.
                td = env.rollout(
                    100_000, policy, break_when_any_done=True, auto_cast_to_device=True
                )
                returns.append(float(td.get(("next", "episode_reward"))[-1].sum()))
                lengths.append(td.shape[0])
                if not (video and i == 0):
                    continue
                key = next((k for k in ("render", "pixels") if k in td.keys()), None)
                if key is not None:
                    seq = torch.cat([td.get(key), td.get(("next", key))[-1:]])
                    frames = seq[: int(self.cfg.eval.video_max_steps)].cpu().numpy()
                # Later episodes need no frames: drop the renderer, it costs a render per step.
                for index in reversed(range(len(env.transform))):
                    if "render" in env.transform[index].out_keys:
                        env.transform.pop(index)
                env.empty_cache()  # specs are cached on the env, not only on the transforms
        env.close()
        self.last_eval = {"returns": returns, "lengths": lengths}
        metrics = {
            "eval/return": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/length": float(np.mean(lengths)),
        }
        return metrics, frames

    # ---- the loop --------------------------------------------------------------------
    def train(self, tracker: Tracker) -> dict:
        """Run the loop to ``train.total_steps`` (offline: ``total_updates``), then the final
        evaluation and checkpoint; a stop (KeyboardInterrupt) saves and returns too."""
        cfg, t, c = self.cfg, self.cfg.train, self.counters
        self._clock = (time.time(), c.get("wall_seconds", 0.0))
        sync = bool(cfg.get("perf", {}).get("sync", False))
        self.phases = Phases(self.step(), sync=self.device if sync else None)
        prune_scratch(self.scratch)
        self._load_stored_experience()
        total = int(t.total_updates if self.offline else t.total_steps)
        done = self.step() >= total  # a finished run resumed: nothing to do
        policy = make_policy(
            self.agent,
            self.action_spec,
            random=c["env_steps"] < t.random_steps,
            compile=bool(cfg.compile.policy),
        )
        collector = None
        if not (done or self.offline):
            # Rank r's envs take the seeds after rank r-1's (workers x envs each).
            per_rank = int(cfg.collector.num_workers) * int(cfg.collector.get("envs", 1))
            seed = int(cfg.seed) + c["env_steps"] + self.world.rank * per_rank
            collector = make_collector(cfg, policy, seed)
            if self.resumed:
                self._resume_episodes(collector)
        bar = tqdm(
            total=total,
            initial=self.step(),
            disable=not (t.progress and self.world.main),
            unit="update" if self.offline else "step",
            dynamic_ncols=True,
        )
        cadence = Cadence(t, self.step(), total)
        status = "FINISHED"
        try:
            if self.offline and not done:
                self._offline_loop(tracker, cadence, bar)
            elif not done:
                self._online_loop(tracker, cadence, bar, policy, collector)
            last_eval = self.returns[-1][0] if self.returns else None
            if self.world.main and last_eval != self.step():
                self._eval_or_save(tracker, video=bool(cfg.eval.video))  # final evaluation
                self._log_open_loop(tracker)
        except KeyboardInterrupt:
            # A user's stop (Ctrl-C, or SIGTERM as pipelines/train.py maps it): save below
            # and return; the caller prints the one line (MLflow's word for it is KILLED).
            status = "STOPPED"
        finally:
            if collector is not None:
                collector.shutdown()
            bar.close()
        return self._finish(tracker, status)

    def _resume_episodes(self, collector) -> None:
        """Continue each env's episode where the checkpoint left it, or say why they start
        new ones (cut episodes in replay, and a walker episode needs 16k env steps to end)."""
        why = restore_acting(collector, self.acting)
        print(f"envs start new episodes: {why}" if why else
              "envs continue their episodes from the checkpoint", flush=True)

    def _online_loop(self, tracker: Tracker, cadence: Cadence, bar: tqdm, policy,
                     collector) -> None:
        """Collect a batch → replay → the updates it is owed → cadence, until done."""
        c, t = self.counters, self.cfg.train
        batches = iter(collector)
        while True:
            with self.phases("collect"):  # acting and env steps
                batch = next(batches)
            n = batch.numel()
            with self.phases("extend"):
                for stream, steps in env_streams(batch.cpu()):
                    self.replay.extend(steps, stream=stream)
                self.acting = acting_state(collector)[0]
            c["env_steps"] += n
            self._record_episodes(batch, tracker)
            if c["pretrained"] < t.get("pretrain", 0) and self.ready():
                self._pretrain(tracker, cadence.means)
            due = self.updates_for(n)
            for k in range(due):  # all but the last may prefetch: no extend comes between
                cadence.means.add(self.update(ahead=k < due - 1))
            if policy.random and c["env_steps"] >= t.random_steps:
                policy.random = False
            collector.update_policy_weights_()
            fps = cadence.rate(c["env_steps"])
            bar.update(n)
            bar.set_postfix(
                updates=c["updates"], fps=f"{fps:.1f}", ret=shown_return(self.last_return)
            )
            if self._after(tracker, cadence, c["env_steps"], fps):
                return

    def _offline_loop(self, tracker: Tracker, cadence: Cadence, bar: tqdm) -> None:
        """Updates from the stored experience alone → cadence, until done."""
        c = self.counters
        while True:
            cadence.means.add(self.update(ahead=True))  # no extends offline
            bar.update(1)
            if self._after(tracker, cadence, c["updates"], cadence.rate(c["updates"])):
                return

    def _after(self, tracker: Tracker, cadence: Cadence, x: int, rate: float) -> bool:
        """What is due at step ``x`` of the run's axis: log (and the disk check), the end,
        evaluation (rank 0), checkpoint. True: stop the loop (done, or the non-finite guard
        tripped: a poisoned state is never checkpointed)."""
        if cadence.log(x):
            self._log_interval(tracker, cadence.means.pop(), rate)
            self.check_disk()
        if self.poisoned or x >= cadence.total:  # the guard is read at log time
            return True
        if cadence.eval(x) and self.world.main:
            with self.phases("eval"):
                self._eval_or_save(tracker)
        if cadence.checkpoint(x):
            if not self.check_finite():
                return True
            with self.phases("checkpoint"):
                self.save()
        return False

    def _finish(self, tracker: Tracker, status: str) -> dict:
        """The last checkpoint (unless the guard tripped, or data-parallel ranks were
        stopped wherever each was) and train's result."""
        if not self.check_finite():  # non-finite guard: the last finite checkpoint stays latest
            return self._poisoned_result(tracker)
        if status == "STOPPED" and self.world.multi:
            # torchrun signals every rank at once: no collective save; the run resumes
            # from its latest periodic checkpoint.
            latest = self._latest_checkpoint()
            return {"status": status, "checkpoint": None if latest == "none" else latest,
                    **self.counters}
        path = self.save()
        tracker.log_artifact(str(path / "meta.json"), "checkpoints")
        return {"status": status, "checkpoint": str(path), **self.counters}

    # ---- stored experience -------------------------------------------------------------
    def _load_stored_experience(self) -> None:
        """train.dataset into replay, once per run (a resumed replay already holds it; a
        resumed run with held-out episodes reads the dataset again for those alone)."""
        loaded = bool(self.counters["dataset_steps"])
        self.heldout = self.make_heldout()
        if self.dataset is None or (loaded and self.heldout is None):
            return
        from .datasets import DatasetError, load_dataset

        w = self.world
        info = load_dataset(
            self.cfg.train.dataset, self.agent, self.replay, heldout=self.heldout,
            heldout_every=self.heldout_every, train=not loaded, shard=(w.rank, w.size),
        )
        if not loaded:
            if not info.steps:  # this rank's shard: nothing to sample, the job would hang
                raise DatasetError(
                    f"dataset {info.name}: rank {w.rank} of {w.size} gets none of its "
                    f"{info.episodes} episodes (each rank trains on 1 in {w.size} of the "
                    "training episodes); valid: fewer processes (NPROC)"
                )
            self.counters["dataset_steps"] = info.steps
            share = f" (rank 0's share: 1 in {w.size} training episodes)" if w.multi else ""
            tqdm.write(
                f"dataset {info.name} ({info.kind}): {info.episodes} episodes, {info.steps:,} "
                f"steps in replay{share}"
            )
        if self.heldout is not None:
            tqdm.write(f"held out: {info.heldout_episodes} episodes, {info.heldout_steps:,} steps")

    def _pretrain(self, tracker: Tracker, means: Means) -> None:
        """train.pretrain updates on the replay as it is, before collection goes on; its
        log lines count pretraining updates (``pretrain/*``). A stop saves and resumes
        mid-way (counter ``pretrained``)."""
        c, t = self.counters, self.cfg.train
        while c["pretrained"] < t.pretrain:
            means.add(self.update())
            c["pretrained"] += 1
            if c["pretrained"] % t.log_every == 0 or c["pretrained"] == t.pretrain:
                logged = {f"pretrain/{k}": float(v) for k, v in means.pop().items()}
                tracker.log_metrics(logged, c["pretrained"])
                self.check_finite()
                tqdm.write(f"pretrain {c['pretrained']}/{t.pretrain} updates")
                if self.poisoned:
                    return

    # ---- non-finite guard ----------------------------------------------------------
    def check_finite(self) -> bool:
        """False once an update's losses or gradients were NaN/inf. Reads the agent's
        device-side guard (one host sync), so it is called at log time and right before each
        checkpoint save, never per update; the first finding sets ``self.poisoned``."""
        if self.poisoned is None:
            found = self.agent.guard.read()
            if found is not None:
                # The guard counts this agent's updates; map its index onto the run's count.
                number = self.counters["updates"] - found.recorded + found.index + 1
                self.poisoned = (
                    f"non-finite update {number} ({found.what()}; {found.bad} of this "
                    f"process's {found.recorded} updates non-finite): run stopped without "
                    f"saving it, latest checkpoint {self._latest_checkpoint()}"
                )
        return self.poisoned is None

    def _latest_checkpoint(self) -> str:
        try:
            return str(find_checkpoint(self.run_dir))
        except CheckpointError:
            return "none"

    def _poisoned_result(self, tracker: Tracker) -> dict:
        """``train``'s result for a run stopped by the guard (nothing saved)."""
        tracker.log_dict({"error": self.poisoned, **self.counters}, "nonfinite.json")
        return {
            "status": "NONFINITE",
            "error": self.poisoned,
            "checkpoint": self._latest_checkpoint(),
            **self.counters,
        }

    def _record_episodes(self, batch: TensorDictBase, tracker: Tracker) -> None:
        """Count and log the episodes that ended in ``batch``; keep the latest return."""
        ends = batch.get(("next", "done")).reshape(-1)
        if not ends.any():
            return
        rets = batch.get(("next", "episode_reward")).reshape(-1)[ends]
        lengths = batch.get(("next", "step_count")).reshape(-1)[ends]
        self.counters["episodes"] += int(ends.sum())
        episode = {
            "train/episode_return": float(rets.mean()),
            "train/episode_length": float(lengths.float().mean()),
        }
        tracker.log_metrics(episode, self.counters["env_steps"])
        self.last_return = float(rets[-1])

    def _log_interval(self, tracker: Tracker, means: dict, rate: float) -> None:
        """The interval's mean losses/metrics and the run's counters, to MLflow (and a
        line on stdout when there is no progress bar: background runs). ``rate``: env
        steps/s, offline updates/s."""
        self.check_finite()  # log time: the guard's one host sync per interval
        c = self.counters
        logged = {f"train/{k}": v for k, v in means.items()}
        logged.update(
            {
                "perf/updates_per_sec" if self.offline else "perf/fps": rate,
                "perf/updates": c["updates"],
                "perf/episodes": c["episodes"],
                "perf/replay": len(self.replay),
            }
        )
        logged.update(self.phases.pop(self.step()))
        if self.heldout is not None and self.heldout.can_sample():
            losses = heldout_loss(self.agent, self.heldout, HELDOUT_BATCHES, self.device)
            logged.update({f"heldout/{k}": v for k, v in losses.items()})
        tracker.log_metrics(logged, self.step())
        if not self.cfg.train.progress and self.world.main:
            print(log_line(c, rate, self.last_return, logged, self.offline), flush=True)

    def _log_open_loop(self, tracker: Tracker) -> None:
        """Open-loop prediction video (pixel envs): real vs imagined frames."""
        if self.poisoned or not self.agent.obs_space.images or not self.replay.can_sample():
            return
        frames = open_loop_video(self.agent, self.replay.sample().to(self.device))
        tracker.log_video(frames, "openloop.mp4", fps=10)

    def _eval_or_save(self, tracker: Tracker, video: bool = False) -> None:
        """Evaluate; if that fails, checkpoint the training first, then let the error end
        the run (its record names it): a broken eval env or renderer loses no training.
        Data-parallel, rank 0 evaluates alone and cannot save without the others: there the
        run resumes from its latest periodic checkpoint."""
        try:
            self._eval_and_log(tracker, video)
        except Exception:
            if not self.world.multi and self.check_finite():
                path = self.save()
                tqdm.write(f"evaluation failed at step {self.step()}: training saved in {path}")
            raise

    def _eval_and_log(self, tracker: Tracker, video: bool) -> None:
        if self.poisoned:  # the run stops: a non-finite agent's return is no result
            return
        metrics, frames = self.evaluate(int(self.cfg.train.eval_episodes), video=video)
        step = self.step()
        self.returns.append((step, metrics["eval/return"]))
        tracker.log_metrics(metrics, step)
        if frames is not None:
            tracker.log_video(frames, "eval_video.mp4")
        tqdm.write(
            f"[eval] step {step}: return {metrics['eval/return']:.1f} "
            f"± {metrics['eval/return_std']:.1f} over {self.cfg.train.eval_episodes} episodes"
        )


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:  # no git on this machine (a bare GPU image): the commit is unknown
        return "unknown"
    return out.stdout.strip() or "unknown"


def check_world(cfg: DictConfig, world: World) -> None:
    """What a data-parallel job cannot do yet: one line naming the setting."""
    if not world.multi:
        return
    backend = str(cfg.collector.get("backend", "local"))
    if backend != "local":
        raise ValueError(
            f"collector.backend={backend} with {world.size} data-parallel processes is not "
            "supported (its workers need this process's default process group): use "
            "collector.backend=local, or NPROC=1"
        )


def replay_capacity(cfg: DictConfig, dataset=None) -> int:
    """The configured capacity, but no more than a run can fill: at most two steps per
    env step (a final step per episode end) — so a short run's memmap buffer and its
    checkpoints are not sized for millions of steps — plus the dataset's steps (an offline
    run: only those)."""
    stored = 0 if dataset is None else int(dataset.size)
    if cfg.train.get("offline", False):
        return stored
    return int(min(cfg.replay.capacity, 2 * cfg.train.total_steps + 1024)) + stored


def open_stored_experience(cfg: DictConfig, agent: DreamerV3Agent, world: World = SINGLE):
    """The train.dataset source, checked against the agent and, data-parallel, for an
    episode per rank (DatasetError, one line), or None without one."""
    if not cfg.train.get("dataset"):
        return None
    from .datasets import DatasetError, check_fits, open_dataset

    source = open_dataset(cfg.train.dataset)
    check_fits(source, agent)
    k = int(cfg.train.get("heldout_every", 0))
    training = source.episodes - (source.episodes // k if k else 0)
    if world.multi and training < world.size:
        raise DatasetError(
            f"dataset {source.name} has {training} complete training episodes "
            f"({source.episodes} in all), fewer than the {world.size} data-parallel "
            f"processes that split them; valid: NPROC <= {max(training, 1)}"
        )
    return source


def fresh_scratch_dir(run_dir: Path) -> Path:
    """A new, empty memmap dir for the live replay (TorchRL cannot load a dumped buffer
    into a scratch dir that already holds files). Stale ones go in :func:`prune_scratch`."""
    path = run_dir / "replay_scratch" / f"{os.getpid()}_{time.time_ns()}"
    path.mkdir(parents=True)
    return path


def prune_scratch(current: Path) -> None:
    """Delete scratch dirs of earlier processes (their data lives on in checkpoints)."""
    for old in current.parent.iterdir():
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def config_params(cfg: DictConfig) -> dict:
    return flatten_config(OmegaConf.to_container(cfg, resolve=True))
