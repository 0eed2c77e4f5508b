"""The tiny model and the tiny training run that several test files share.

``MODEL``: size1m shrunk to ~40k parameters. ``RUN``: train.py overrides for a 64-env-step
untracked run of it (3 updates, no compilation, no video); ``train_tiny`` runs one in-process.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = dict(deter=64, hidden=16, classes=4, units=16, depth=2)

RUN = [
    "model.deter=64",
    "model.hidden=16",
    "model.units=16",
    "model.classes=4",
    "train.total_steps=64",
    "train.train_start=32",
    "train.random_steps=32",
    "train.batch_size=2",
    "train.seq_len=8",
    "train.train_ratio=1",
    "train.log_every=32",
    "train.eval_episodes=1",
    "train.progress=false",
    "replay.capacity=1000",
    "tracking.enabled=false",
    "compile.policy=false",
    "compile.steps=false",
    "eval.video=false",
    "device=cpu",
]


def train_tiny(root: Path, env: str, extra: tuple[str, ...] = ()) -> Path:
    """Train a 64-step run of ``env`` into ``root/env``; returns its run dir."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipelines import train

    run_dir = root / env
    handler = signal.getsignal(signal.SIGTERM)  # train.main turns SIGTERM into Ctrl-C
    try:
        assert train.main([f"env={env}", *RUN, *extra, f"run_dir={run_dir}"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    return run_dir
