"""Stored experience into the replay the agent trains from.

In (:func:`load_dataset`): a Minari dataset (a path, or the id of a local one: nothing is
downloaded) or a dreamer_trl run's replay (a run dir or checkpoint). Both are rewritten in
the collector's transition layout and go through :meth:`StepReplay.extend`, the path online
data takes, so one function (:func:`sequence.transitions_to_steps`) builds the reference's
steps for all of them:

    Minari episode (T steps)          reference steps t = 0..T
    observations o_0 … o_T            step t holds o_t
    actions      a_0 … a_{T-1}        and the action taken there (zeros at t = T)
    rewards      r(a_0) … r(a_{T-1})  and the reward that came with o_t (0 at t = 0)
    terminations / truncations        is_first at t = 0, is_last at t = T,
      (set at the last step only)     is_terminal = terminated (a truncation is not one)

Every episode of a dataset is one stream of steps, episode after episode, as one env's
are; a dataset's streams are numbered from ``DATASET_STREAM`` so they never join a
collector's. Stored data has no acting posteriors: its steps' latents are zeros until
training writes its posteriors back (replay context), as for a fresh online step's
final observation.

Observation and action spaces are mapped as :mod:`dreamer_trl.envs` maps an env's (float
vectors, integer spaces one-hot encoded, uint8 HxWxC images as "pixels" [C, H, W]; Discrete
actions one-hot, Box actions scaled onto [-1, 1]) and checked against the agent as an env's
specs are. Bad input is a :class:`DatasetError`, one line naming what is wrong and what fits.

Out, a run's stored episodes as a Minari dataset: :mod:`dreamer_trl.minari_export`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite, OneHot, TensorSpec, Unbounded

from .agent import DreamerV3Agent, action_info, obs_space_from_spec
from .checkpoint import REPLAY_DIR, CheckpointError, load_checkpoint, verified_checkpoint
from .envs import SUPPORTED_SPACES, _is_image, _supported_action_space, integer_bounds, make_env
from .replay import DUMP_FORMAT, DUMP_INFO, STEPS_DIR, StepReplay
from .transforms import INCOMING_REWARD
from .world_model import ObsSpace

# Stream ids of stored experience start here: above any collector's env index (device-
# batched envs number thousands of streams), so a dataset never continues an env stream.
DATASET_STREAM = 1 << 20
METADATA = "metadata.json"  # Minari's file in a dataset's data/ dir


class DatasetError(ValueError):
    """A dataset that cannot be trained from, or a run that cannot be exported: one line."""


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` put into the replay."""

    name: str
    kind: str  # "minari" or "run"
    episodes: int  # complete episodes (a run's replay may also hold partial ones)
    steps: int  # steps added to the replay
    streams: tuple[int, ...]
    heldout_episodes: int = 0  # episodes put into the held-out replay instead
    heldout_steps: int = 0


# --------------------------------------------------------------------------- in


def load_dataset(
    source: str | Path,
    agent: DreamerV3Agent,
    replay: StepReplay,
    *,
    stream: int = DATASET_STREAM,
    queue: bool = False,
    heldout: StepReplay | None = None,
    heldout_every: int = 0,
    train: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> DatasetInfo:
    """Add the steps of ``source`` (Minari path or local id, run dir or checkpoint) to
    ``replay``, after checking its spaces against ``agent``'s.

    ``queue``: also put its sequences in the online queue (a batch takes queued sequences
    first, so the first updates would sweep the whole dataset in order and online steps
    would wait behind it); by default the dataset is sampled uniformly only.

    ``heldout``, ``heldout_every`` = k: every k-th complete episode of each stream goes to
    ``heldout`` instead (a validation set the agent never trains on), with the agent's
    initial latents as replay context, since no posterior of this agent exists for it.
    ``train=False`` fills only ``heldout`` (a resumed run's replay already holds the rest).
    Without ``heldout`` the held-out episodes are left out all the same (a data-parallel
    rank that does not validate must not train on them either).

    ``shard`` = (r, n): the replay gets the training episodes whose number (counted over
    all streams, in the source's order) is r modulo n — rank r of n data-parallel processes:
    the ranks split the dataset and each trains on its own part; the held-out episodes are
    the same for every shard.
    """
    if heldout is not None and heldout_every < 2:
        raise ValueError(f"heldout_every={heldout_every} is invalid: must be >= 2 with heldout")
    rank, ranks = shard
    if not 0 <= rank < ranks:
        raise ValueError(f"shard={shard} is invalid: need 0 <= rank < processes")
    src = open_dataset(source)
    check_fits(src, agent)
    if src.size > replay.capacity:
        raise DatasetError(
            f"dataset {src.name} gives {src.size:,} steps, more than the replay holds "
            f"(capacity {replay.capacity:,}); valid: replay.capacity >= {src.size:,}"
        )
    initial = agent.world_model.rssm.initial
    batches = src.transitions(initial)
    added, streams, begun, deal = 0, set(), {}, Deal()
    held_episodes = held_steps = 0
    while True:
        with _readable(src.name):  # reading the source, not writing the replay
            item = next(batches, None)
        if item is None:
            break
        offset, transitions = item
        number, begun[offset] = episode_numbers(transitions, begun.get(offset, 0))
        held = heldout_mask(number, heldout_every)
        if heldout is not None and held.any():
            part = with_initial_latents(transitions[held], initial)
            held_episodes += int(part.get("is_init").sum())
            held_steps += heldout.extend(part, stream=stream + offset)
        dealt = deal(offset, number, training_number(number, heldout_every))
        mine = ~held & (dealt % ranks == rank)
        transitions = transitions[mine]
        if train and transitions.shape[0]:
            added += replay.extend(transitions, stream=stream + offset)
            streams.add(stream + offset)
    if not queue:
        # The online queue is public state of StepReplay; its pending tails of these
        # streams stay (under T+1 indices each) and are never completed.
        replay.queue = deque(entry for entry in replay.queue if entry[0] not in streams)
    return DatasetInfo(src.name, src.kind, src.episodes, added, tuple(sorted(streams)),
                       held_episodes, held_steps)


def episode_numbers(transitions: TensorDictBase, begun: int) -> tuple[torch.Tensor, int]:
    """The episode number [n] of each transition of one stream, counted by is_init
    (``begun`` episodes begun in earlier chunks; a leading partial one is episode 0), and
    the episodes begun by the end of this chunk."""
    number = begun + torch.cumsum(transitions.get("is_init").reshape(-1), 0)
    return number, int(number[-1])


def heldout_mask(number: torch.Tensor, k: int) -> torch.Tensor:
    """Every k-th episode (0: none); episode 0, perhaps partial, is never held out."""
    if not k:
        return torch.zeros_like(number, dtype=torch.bool)
    return (number > 0) & (number % k == 0)


def training_number(number: torch.Tensor, k: int) -> torch.Tensor:
    """The number of each (not held-out) episode among the training episodes alone, so
    that shards deal those out in turn whatever k is (numbering all episodes, k = 2 and two
    shards would give one shard every training episode)."""
    return number - number // k if k else number


class Deal:
    """Numbers the training episodes of all streams in one sequence (the streams come one
    after another), so that shards take turns across streams too: a run's replay holds a
    few episodes in each of many streams."""

    def __init__(self):
        self.base: dict[int, int] = {}  # stream offset -> its first episode's number
        self.total = 0  # training episodes numbered so far

    def __call__(self, offset: int, number: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
        if offset not in self.base:  # a stream that starts with a whole episode has no 0th
            self.base[offset] = self.total - (1 if int(number[0]) > 0 else 0)
        dealt = self.base[offset] + training
        self.total = int(dealt[-1]) + 1
        return dealt


def with_initial_latents(transitions: TensorDictBase, initial) -> TensorDictBase:
    """``transitions`` [n] with the latents ``initial(n)`` (the RSSM's initial state)."""
    deter, stoch = initial(transitions.shape[0])
    out = transitions.clone(False)
    for key, value in ((("next", "deter"), deter), (("next", "stoch"), stoch)):
        like = out.get(key)
        out.set(key, value.to(like.device, like.dtype))
    return out


def open_dataset(source: str | Path) -> MinariSource | RunSource:
    """The source behind a path (Minari dataset dir, run dir, checkpoint) or a local
    Minari id; DatasetError (one line) when it is none of these, empty or unreadable."""
    path = Path(source).expanduser()
    if not path.exists():
        return MinariSource.from_id(str(source))
    data = minari_data_dir(path)
    if data is not None:
        return MinariSource.from_path(data, str(source))
    try:
        return RunSource(path, str(source))
    except CheckpointError as err:
        if "no checkpoint" not in str(err):
            raise DatasetError(f"dataset={source}: {err}") from None
        raise DatasetError(
            f"dataset={source} is neither a Minari dataset (a dir with data/{METADATA}) nor "
            "a dreamer_trl run dir or checkpoint (checkpoints/latest, step_<N>/state.pt)"
        ) from None


def check_fits(src: MinariSource | RunSource, agent: DreamerV3Agent) -> None:
    """Raise DatasetError unless the source's observations and actions are the agent's."""
    try:
        have = obs_space_from_spec(src.observation_spec, src.obs_keys)
        dim, discrete = action_info(src.action_spec)
    except ValueError as err:
        raise DatasetError(f"dataset {src.name}: {err}") from None
    # The agent is built from the env the run names: a misfit most often means that env
    # is not the one the data was recorded on, so say which one that was where known.
    origin = f"; it was recorded on {src.recorded_on}: run on that env" if src.recorded_on else ""
    if have != agent.obs_space:
        raise DatasetError(
            f"dataset {src.name} does not fit the agent: it observes {describe_obs(have)}, "
            f"the agent reads {describe_obs(agent.obs_space)}{origin}"
        )
    if (dim, discrete) != (agent.action_dim, agent.discrete):
        raise DatasetError(
            f"dataset {src.name} does not fit the agent: its actions are "
            f"{describe_action(dim, discrete)}, the agent's are "
            f"{describe_action(agent.action_dim, agent.discrete)}{origin}"
        )


def describe_obs(space: ObsSpace) -> str:
    parts = [f"{k} float [{n}]" for k, n in sorted(space.vectors.items())]
    parts += [
        f"{k} integer [{v.size}] with {'/'.join(map(str, sorted(set(v.classes))))} classes"
        for k, v in sorted(space.integers.items())
    ]
    parts += [f"{k} uint8 {list(s)}" for k, s in sorted(space.images.items())]
    return ", ".join(parts) or "nothing"


def describe_action(dim: int, discrete: bool) -> str:
    return f"discrete ({dim} choices)" if discrete else f"continuous [{dim}]"


@contextlib.contextmanager
def _readable(name: str) -> Iterator[None]:
    """Reading errors of the storage libraries (h5py, json, Minari's asserts) → one line."""
    try:
        yield
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(
            f"dataset {name} is corrupt or unreadable ({first}); valid: a Minari dataset that "
            "minari.load_dataset reads, or a verified dreamer_trl checkpoint"
        ) from None


# --------------------------------------------------------------------------- Minari


def minari_data_dir(path: Path) -> Path | None:
    """The data/ dir of a Minari dataset at ``path`` (the dataset dir or data/ itself)."""
    if (path / METADATA).is_file() and path.name == "data":
        return path
    if (path / "data" / METADATA).is_file():
        return path / "data"
    return None


class MinariSource:
    """A Minari dataset: its spaces as agent specs, its episodes as transitions."""

    kind = "minari"

    def __init__(self, dataset: Any, name: str):
        self.dataset, self.name = dataset, name
        self.episodes = int(dataset.total_episodes)
        if self.episodes == 0 or int(dataset.total_steps) == 0:
            raise DatasetError(
                f"dataset {name} is empty ({self.episodes} episodes, {dataset.total_steps} "
                "steps): nothing to train on; valid: a dataset with at least one episode"
            )
        self.size = int(dataset.total_steps) + self.episodes  # T+1 steps per episode
        obs = ObservationMap.of(dataset.observation_space, name)
        self.obs_map, self.act_map = obs, ActionMap.of(dataset.action_space, name)
        self.obs_keys = [obs.key]
        self.observation_spec = Composite({obs.key: obs.spec})
        self.action_spec = self.act_map.spec
        env_spec = getattr(dataset.spec, "env_spec", None)
        self.recorded_on = f"gymnasium env {env_spec.id}" if env_spec is not None else None

    @classmethod
    def from_path(cls, data_dir: Path, name: str) -> MinariSource:
        minari = import_minari()
        with _readable(name):
            return cls(minari.MinariDataset(data_dir), name)

    @classmethod
    def from_id(cls, dataset_id: str) -> MinariSource:
        minari = import_minari()
        try:
            dataset = minari.load_dataset(dataset_id, download=False)
        except FileNotFoundError:
            raise DatasetError(_not_found(dataset_id)) from None
        except (OSError, ValueError, KeyError, AssertionError) as err:
            raise DatasetError(
                f"dataset {dataset_id} is corrupt or unreadable ({str(err).splitlines()[0]}); "
                "valid: a Minari dataset that minari.load_dataset reads"
            ) from None
        with _readable(dataset_id):
            return cls(dataset, dataset_id)

    def transitions(self, initial) -> Iterator[tuple[int, TensorDictBase]]:
        """(stream offset 0, transitions [T]) per episode, in the dataset's order."""
        for episode in self.dataset.iterate_episodes():
            if len(episode.rewards):  # an episode of 0 steps gives no transition
                yield 0, self.episode_transitions(episode, initial)

    def episode_transitions(self, episode: Any, initial) -> TensorDictBase:
        """One episode in the collector's layout: root o_t, a_t, the reward that came with
        o_t and is_init; under "next" o_{t+1}, its reward, done/terminated, the latents."""
        n = len(episode.rewards)
        obs = self.obs_map.convert(episode.observations, n + 1)
        terminated = _episode_end(episode, n, self.name)
        reward = torch.as_tensor(np.asarray(episode.rewards), dtype=torch.float32).reshape(n, 1)
        flag = torch.zeros(n, 1, dtype=torch.bool)
        first, done, term = flag.clone(), flag.clone(), flag.clone()
        first[0], done[-1], term[-1] = True, True, terminated
        deter, stoch = initial(n)
        nxt = TensorDict(
            {
                self.obs_map.key: obs[1:],
                "reward": reward,
                "done": done,
                "terminated": term,
                "truncated": done & ~term,
                "deter": deter,
                "stoch": stoch,
            },
            [n],
        )
        incoming = torch.cat([torch.zeros(1, 1), reward[:-1]])
        return TensorDict(
            {
                self.obs_map.key: obs[:-1],
                "action": self.act_map.convert(episode.actions, n),
                INCOMING_REWARD: incoming,
                "is_init": first,
                "next": nxt,
            },
            [n],
        )


def _episode_end(episode: Any, n: int, name: str) -> bool:
    """Whether the episode terminated; its flags may be set only at its last step. An
    episode that ends with neither flag ends where the data does: a truncation (Minari's
    own DataCollector marks an unfinished episode truncated the same way)."""
    term = np.asarray(episode.terminations, dtype=bool).reshape(-1)
    trunc = np.asarray(episode.truncations, dtype=bool).reshape(-1)
    if len(term) != n or len(trunc) != n:
        raise DatasetError(
            f"dataset {name}: episode {episode.id} has {n} rewards but {len(term)} "
            f"terminations and {len(trunc)} truncations; valid: one of each per step"
        )
    early = np.flatnonzero(term[:-1] | trunc[:-1])
    if early.size:
        raise DatasetError(
            f"dataset {name}: episode {episode.id} ends at step {early[0] + 1} of {n} "
            "(terminated or truncated before its last step); valid: an episode's flags are "
            "set at its last step only"
        )
    return bool(term[-1])


def _not_found(dataset_id: str) -> str:
    minari = import_minari()
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns for each misconfigured dataset dir
        local = sorted(minari.list_local_datasets())
    listed = ", ".join(local[:8]) + (", …" if len(local) > 8 else "") if local else "none"
    return (
        f"dataset={dataset_id} is no path and no local Minari dataset in {root} (local ids: "
        f"{listed}); nothing is downloaded: give a path, or set MINARI_DATASETS_PATH"
    )


def import_minari():
    try:
        import minari
    except ImportError:
        raise DatasetError(
            "Minari datasets need the minari package: pip install -e '.[offline]'"
        ) from None
    return minari


@dataclass(frozen=True)
class ObservationMap:
    """A gym observation space → the agent's key, spec and tensors (as envs.py maps it)."""

    key: str
    kind: str  # "vector" | "integer" | "image"
    spec: TensorSpec

    @classmethod
    def of(cls, space: gym.Space, name: str) -> ObservationMap:
        if isinstance(space, gym.spaces.Box) and _is_image(space):
            h, w, c = space.shape
            spec = Bounded(low=0, high=255, shape=(c, h, w), dtype=torch.uint8)
            return cls("pixels", "image", spec)
        bounds = integer_bounds(space)
        if bounds is not None:
            low, high = (torch.as_tensor(b, dtype=torch.int64) for b in bounds)
            spec = Bounded(low=low, high=high, shape=low.shape, dtype=torch.int64)
            return cls("observation", "integer", spec)
        if isinstance(space, gym.spaces.Box) and len(space.shape) in (1, 2):
            return cls("observation", "vector", Unbounded(shape=(int(np.prod(space.shape)),)))
        raise DatasetError(
            f"dataset {name}: observation space {space} is not supported; supported: "
            f"{SUPPORTED_SPACES} (as for envs)"
        )

    def convert(self, obs: Any, n: int) -> torch.Tensor:
        if self.kind == "image":  # [n, H, W, C] → [n, C, H, W]
            return torch.as_tensor(np.asarray(obs, dtype=np.uint8)).permute(0, 3, 1, 2)
        if self.kind == "integer":
            parts = obs if isinstance(obs, tuple) else (obs,)  # Tuple of Discrete: a tuple
            flat = [np.asarray(p).reshape(n, -1) for p in parts]
            return torch.as_tensor(np.concatenate(flat, -1).astype(np.int64))
        return torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(n, -1))


@dataclass(frozen=True)
class ActionMap:
    """A gym action space ↔ the agent's actions: Discrete ↔ one-hot float, Box ↔ [-1, 1]
    (the env's ActionScaling: a_env = a·scale + loc, the agent's action clipped first)."""

    spec: TensorSpec
    low: np.ndarray | None = None  # Box bounds, or Discrete start [1]
    high: np.ndarray | None = None

    @classmethod
    def of(cls, space: gym.Space, name: str) -> ActionMap:
        if isinstance(space, gym.spaces.Discrete):
            return cls(OneHot(int(space.n), dtype=torch.float32), np.array([space.start]))
        if _supported_action_space(space):
            dim = int(space.shape[0])
            spec = Bounded(low=-1.0, high=1.0, shape=(dim,), dtype=torch.float32)
            return cls(spec, space.low.astype(np.float64), space.high.astype(np.float64))
        raise DatasetError(
            f"dataset {name}: action space {space} is not supported; supported: Discrete, "
            "or 1-D Box with finite bounds (as for envs)"
        )

    @property
    def discrete(self) -> bool:
        return isinstance(self.spec, OneHot)

    def convert(self, actions: Any, n: int) -> torch.Tensor:
        """Dataset actions [n] or [n, A] → the agent's [n, A] float32."""
        a = np.asarray(actions)
        if self.discrete:
            index = torch.as_tensor(a.reshape(n).astype(np.int64) - int(self.low[0]))
            return torch.nn.functional.one_hot(index, self.spec.shape[-1]).float()
        loc, scale = (self.high + self.low) / 2, (self.high - self.low) / 2
        return torch.as_tensor(((a.reshape(n, -1) - loc) / scale).astype(np.float32))

    def to_env(self, actions: torch.Tensor) -> np.ndarray:
        """The agent's actions [n, A] → the env's: indices, or clipped and scaled."""
        if self.discrete:
            return actions.argmax(-1).numpy().astype(np.int64) + int(self.low[0])
        a = actions.double().clamp(-1.0, 1.0).numpy()
        loc, scale = (self.high + self.low) / 2, (self.high - self.low) / 2
        return np.clip(a * scale + loc, self.low, self.high).astype(np.float32)


# --------------------------------------------------------------------------- runs


class RunSource:
    """A dreamer_trl run's stored replay (run dir or checkpoint), per env stream. The rows
    stay memory-mapped: they are read a chunk (or an episode) at a time."""

    kind = "run"
    chunk = 4096  # rows read and converted at a time (an image run's replay can be GBs)

    def __init__(self, path: Path, name: str):
        self.name = name
        self.ckpt = verified_checkpoint(path)
        state = load_checkpoint(self.ckpt, verify=False)
        self.config = state.get("config")
        if not isinstance(self.config, dict) or "env" not in self.config:
            raise DatasetError(f"dataset {name}: checkpoint {self.ckpt} has no stored config")
        self.commit = state.get("commit", "unknown")
        env_cfg = self.config["env"]
        self.recorded_on = f"env suite {env_cfg.get('suite')} task {env_cfg.get('task')}"
        self.env_steps = int(state.get("counters", {}).get("env_steps", 0))
        self.rows = read_replay_rows(self.ckpt, name)
        self.orders = stream_orders(self.rows, name)
        self.size = int(self.rows.shape[0])
        self.episodes = sum(len(self.episodes_of(i)) for i in range(len(self.orders)))
        env = make_env(self.config["env"], seed=0)
        try:
            self.observation_spec = env.observation_spec.clone()
            self.action_spec = env.action_spec.clone()
            self.env_action_spec = env.base_env.action_spec.clone()  # the env's own bounds
        finally:
            env.close()
        self.obs_keys = list(state.get("meta", {}).get("obs_keys") or []) or [
            k for k in ("observation", "pixels") if k in self.observation_spec.keys()
        ]

    def episodes_of(self, stream: int) -> list[tuple[int, int]]:
        """(first, last) position in stream ``stream`` of each complete episode."""
        order = self.orders[stream]
        first, last = (self.rows.get(k).reshape(-1)[order] for k in ("is_first", "is_last"))
        return episode_bounds(first, last)

    def stream_rows(self, stream: int, lo: int, hi: int) -> TensorDictBase:
        """Rows lo..hi-1 of stream ``stream``, in step order, in memory."""
        return self.rows[self.orders[stream][lo:hi]].to_tensordict()

    def transitions(self, initial=None) -> Iterator[tuple[int, TensorDictBase]]:
        """(stream offset, transitions) a chunk at a time; the latents are the stored
        ones (refreshed by training), ``initial`` is unused. Chunks overlap by one row:
        a chunk's last row is the next chunk's first transition."""
        for offset, order in enumerate(self.orders):
            for lo in range(0, len(order) - 1, self.chunk):
                rows = self.stream_rows(offset, lo, lo + self.chunk + 1)
                td = steps_to_transitions(rows, self.obs_keys)
                if td.shape[0]:
                    yield offset, td


def read_replay_rows(ckpt: Path, name: str) -> TensorDictBase:
    """The filled rows of a checkpoint's replay dump (StepReplay.dumps, format 2)."""
    replay_dir = ckpt / REPLAY_DIR
    info_file = replay_dir / DUMP_INFO
    if not replay_dir.is_dir():
        raise DatasetError(
            f"dataset {name} is empty: checkpoint {ckpt} stored no replay steps; valid: a "
            "checkpoint written after the run collected steps"
        )
    if not info_file.is_file():
        raise DatasetError(
            f"dataset {name}: checkpoint {ckpt} holds its replay in TorchRL's dense dump "
            f"(before format {DUMP_FORMAT}); valid: resume the run once with this version "
            "and let it checkpoint, which rewrites it"
        )
    with _readable(name):
        info = json.loads(info_file.read_text())
        if int(info.get("rows", 0)) == 0:
            raise DatasetError(
                f"dataset {name} is empty: the replay of {ckpt} holds 0 steps; valid: a "
                "checkpoint written after the run collected steps"
            )
        rows = TensorDict.load_memmap(replay_dir / STEPS_DIR)
    return rows


def stream_orders(rows: TensorDictBase, name: str) -> list[torch.Tensor]:
    """Row indices of each env stream, in step order (a circular buffer that wrapped
    stores them out of order); a gap inside a stream means a damaged dump."""
    stream, step = rows.get("stream").reshape(-1), rows.get("stream_step").reshape(-1)
    order = torch.argsort(step, stable=True)
    order = order[torch.argsort(stream[order], stable=True)]
    _, counts = torch.unique_consecutive(stream[order], return_counts=True)
    out = []
    for index in torch.split(order, counts.tolist()):
        steps = step[index]
        gaps = torch.nonzero(steps.diff() != 1).reshape(-1)
        if gaps.numel():
            at = int(steps[gaps[0]])
            raise DatasetError(
                f"dataset {name} is corrupt: stream {int(stream[index[0]])} of its replay "
                f"jumps from step {at} to {int(steps[gaps[0] + 1])}; valid: consecutive steps"
            )
        out.append(index)
    return out


def steps_to_transitions(rows: TensorDictBase, obs_keys: list[str]) -> TensorDictBase:
    """One stream's steps [n] → the collector's transitions, which ``transitions_to_steps``
    turns back into the same steps: each non-final step with the next one as "next". A
    final step begins no transition; the oldest row, when it is a final step whose episode
    was overwritten, and the newest, when its episode is unfinished, are dropped."""
    cur, nxt = rows[:-1], rows[1:]
    n = cur.shape[0]
    col = lambda td, key: td.get(key).reshape(n, 1)  # noqa: E731
    out = TensorDict(
        {k: cur.get(k) for k in obs_keys}
        | {
            "action": cur.get("action"),
            INCOMING_REWARD: col(cur, "reward"),
            "is_init": col(cur, "is_first"),
            "next": TensorDict(
                {k: nxt.get(k) for k in obs_keys}
                | {
                    "reward": col(nxt, "reward"),
                    "done": col(nxt, "is_last"),
                    "terminated": col(nxt, "is_terminal"),
                    "truncated": col(nxt, "is_last") & ~col(nxt, "is_terminal"),
                    "deter": cur.get("deter"),
                    "stoch": cur.get("stoch"),
                },
                [n],
            ),
        },
        [n],
    )
    return out[~cur.get("is_last").reshape(n)]


def episode_bounds(first: torch.Tensor, last: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) position of every complete episode in one stream's is_first/is_last
    flags [n]: from an is_first step to the next is_last one."""
    starts = torch.nonzero(first).reshape(-1).tolist()
    ends = iter(torch.nonzero(last).reshape(-1).tolist())
    out, end = [], next(ends, None)
    for start in starts:
        while end is not None and end < start:
            end = next(ends, None)
        if end is None:
            break
        out.append((start, end))
    return out


__all__ = [
    "DATASET_STREAM",
    "DatasetError",
    "DatasetInfo",
    "MinariSource",
    "RunSource",
    "check_fits",
    "load_dataset",
    "open_dataset",
]
