"""A run's stored episodes out as a Minari dataset (:func:`export_minari`, ``make dataset``):
hdf5, images stored raw, with the env's own spaces — actions clipped and scaled back onto
the env's bounds — and read back with Minari and checked before it is reported written.
The way in is :func:`dreamer_trl.datasets.load_dataset`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torchrl.data import Bounded, OneHot

from .datasets import ActionMap, DatasetError, RunSource, import_minari


@dataclass(frozen=True)
class ExportInfo:
    dataset_id: str
    path: Path  # the dataset dir (holding data/)
    episodes: int
    steps: int  # Minari steps (transitions): Σ episode lengths
    skipped: int  # stored steps outside complete episodes


def export_minari(
    run: str | Path, root: str | Path, dataset_id: str | None = None
) -> ExportInfo:
    """Write the complete episodes of a run's replay as a Minari dataset under ``root``
    (a Minari datasets dir: ``MINARI_DATASETS_PATH=root`` finds it by id), then load it
    back with Minari and check it."""
    minari = import_minari()
    src = RunSource(Path(run).expanduser(), str(run))
    if len(src.obs_keys) != 1:
        raise DatasetError(
            f"run {run} observes {', '.join(src.obs_keys)}; valid for a Minari export: one "
            "observation key"
        )
    dataset_id = dataset_id or default_dataset_id(src)
    root = Path(root).expanduser().resolve()
    _check_new_id(dataset_id, root)
    obs_space, actions = _env_spaces(src)
    buffers = list(_episode_buffers(src, actions))
    if not buffers:
        raise DatasetError(f"run {run} has no complete episode in its replay: nothing to export")
    with _datasets_path(root), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is set to None.*")
        warnings.filterwarnings("ignore", message="env_spec is None.*")
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=_gym_spec(src.config["env"]),
            observation_space=obs_space,
            action_space=actions.space,
            algorithm_name="DreamerV3 (dreamer_trl)",
            author="dreamer_trl",
            code_permalink=f"dreamer_trl commit {src.commit}",
            description=_description(src),
            data_format="hdf5",
            jpeg_encoding=False,  # lossless: the steps must round-trip
        )
        dataset = minari.load_dataset(dataset_id)  # Minari reads its metadata back
        problem = validate_minari(dataset)
    steps = sum(len(b.rewards) for b in buffers)
    if not problem and (dataset.total_episodes, dataset.total_steps) != (len(buffers), steps):
        problem = (
            f"it holds {dataset.total_episodes} episodes / {dataset.total_steps} steps, "
            f"{len(buffers)} / {steps} were written"
        )
    if problem:
        raise DatasetError(f"Minari dataset {root / dataset_id} did not read back: {problem}")
    kept = steps + len(buffers)
    return ExportInfo(dataset_id, root / dataset_id, len(buffers), steps, src.size - kept)


def validate_minari(dataset: Any) -> str | None:
    """What is wrong with a loaded Minari dataset (None: nothing): every episode holds one
    more observation than actions, one reward and flag per step, and every observation
    and action lies in the dataset's spaces (the checks Minari's DataCollector makes per
    step, here over whole episodes)."""
    for ep in dataset.iterate_episodes():
        n = len(ep.rewards)
        sizes = (len(ep.observations), len(ep.actions), len(ep.terminations), len(ep.truncations))
        if sizes != (n + 1, n, n, n):
            return f"episode {ep.id} has observations/actions/terminations/truncations {sizes}"
        for what, space, batch in (
            ("observation", dataset.observation_space, ep.observations),
            ("action", dataset.action_space, ep.actions),
        ):
            if not _within(space, np.asarray(batch)):
                return f"episode {ep.id} has an {what} outside {space}"
    return None


def _within(space: gym.Space, batch: np.ndarray) -> bool:
    """Whether every row of ``batch`` lies in ``space`` (Box or Discrete)."""
    if isinstance(space, gym.spaces.Discrete):
        return bool(np.all((batch >= space.start) & (batch < space.start + space.n)))
    if batch.shape[1:] != space.shape or not np.can_cast(batch.dtype, space.dtype):
        return False
    return bool(np.all((batch >= space.low) & (batch <= space.high)))


def _check_new_id(dataset_id: str, root: Path) -> None:
    """One line for an id Minari would refuse (malformed, or taken) before any write."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(
            f"id={dataset_id!r} is no Minari dataset id; valid: (namespace/)name-v<N> of "
            "letters, digits, '-' and '_', e.g. dreamer_trl/pendulum/run1-v0"
        ) from None
    if (root / dataset_id).exists():
        raise DatasetError(
            f"id={dataset_id!r} exists already in {root}; valid: a new id (or version "
            f"-v<N+1>), or delete {root / dataset_id} first"
        )


def default_dataset_id(src: RunSource) -> str:
    """dreamer_trl/<env>/<run>-v0: the run dir's name, or the checkpoint's."""
    run_dir = src.ckpt.parent.parent if src.ckpt.parent.name == "checkpoints" else src.ckpt
    clean = lambda s: re.sub(r"[^-\w]", "_", s)  # noqa: E731 (Minari's id alphabet)
    env = clean(str(src.config["env"].get("name", "env")))
    return f"dreamer_trl/{env}/{clean(run_dir.name)}-step{src.env_steps}-v0"


def _env_spaces(src: RunSource) -> tuple[gym.Space, _GymActions]:
    key = src.obs_keys[0]
    spec = src.observation_spec[key]
    if key == "pixels" or spec.dtype == torch.uint8 and len(spec.shape) == 3:
        c, h, w = spec.shape
        obs = gym.spaces.Box(0, 255, (h, w, c), np.uint8)
    elif not spec.dtype.is_floating_point:
        low, high = spec.space.low.numpy(), spec.space.high.numpy()
        obs = gym.spaces.Box(low, high, low.shape, np.int64)
    elif isinstance(spec, Bounded):  # the env's own bounds (gym Boxes keep theirs)
        low, high = spec.space.low.numpy(), spec.space.high.numpy()
        obs = gym.spaces.Box(low, high, low.shape, np.float32)
    else:
        obs = gym.spaces.Box(-np.inf, np.inf, tuple(spec.shape), np.float32)
    return obs, _GymActions.of(src)


@dataclass(frozen=True)
class _GymActions:
    space: gym.Space
    map: ActionMap

    @classmethod
    def of(cls, src: RunSource) -> _GymActions:
        if isinstance(src.action_spec, OneHot):
            space = gym.spaces.Discrete(int(src.action_spec.shape[-1]))
        else:
            bounds = src.env_action_spec.space
            low, high = bounds.low.numpy(), bounds.high.numpy()
            space = gym.spaces.Box(low, high, low.shape, np.float32)
        return cls(space, ActionMap.of(space, src.name))


def _episode_buffers(src: RunSource, actions: _GymActions) -> Iterator[Any]:
    from minari.data_collector import EpisodeBuffer

    key, image = src.obs_keys[0], src.obs_keys[0] == "pixels"
    number = 0
    for stream in range(len(src.orders)):
        for start, end in src.episodes_of(stream):
            ep = src.stream_rows(stream, start, end + 1)
            obs = ep.get(key)
            obs = obs.permute(0, 2, 3, 1) if image else obs
            n = end - start
            terminal = bool(ep.get("is_terminal")[-1])
            done = np.zeros(n, dtype=bool)
            done[-1] = True
            yield EpisodeBuffer(
                id=number,
                observations=np.ascontiguousarray(obs.numpy()),
                actions=actions.map.to_env(ep.get("action")[:-1]),
                rewards=ep.get("reward")[1:].numpy().astype(np.float64),
                terminations=done & terminal,
                truncations=done & (not terminal),
                infos={},
            )
            number += 1


def _gym_spec(env_cfg: dict) -> Any:
    """The gym EnvSpec a gym-suite run stepped (with its step limit) so Minari can
    recover the env; None for other suites and for action repeats (whose steps are not
    the gym env's)."""
    if env_cfg.get("suite") != "gym" or int(env_cfg.get("action_repeat", 1)) != 1:
        return None
    spec = gym.spec(env_cfg["task"])
    limit = env_cfg.get("max_episode_steps")
    return dataclasses.replace(spec, max_episode_steps=int(limit)) if limit else spec


def _description(src: RunSource) -> str:
    env = src.config["env"]
    return (
        f"Replay of a dreamer_trl DreamerV3 run ({src.ckpt}, {src.env_steps} env steps): "
        f"env suite {env.get('suite')} task {env.get('task')}, action repeat "
        f"{env.get('action_repeat', 1)}. Complete episodes only; actions as the env took them."
    )


@contextlib.contextmanager
def _datasets_path(root: Path) -> Iterator[None]:
    """Minari reads its datasets root from MINARI_DATASETS_PATH at every call."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


__all__ = ["ExportInfo", "export_minari", "validate_minari"]
