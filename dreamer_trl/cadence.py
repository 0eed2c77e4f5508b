"""The loop's bookkeeping: when something is due (log, eval, checkpoint), running means
of update outputs, where wall time goes (phases), env-step rate and the log line.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from tensordict import TensorDictBase


def log_line(
    counters: dict, rate: float, last_return: float, logged: dict, offline: bool = False
) -> str:
    """One interval as a line: ``rate`` is env steps/s, or updates/s when ``offline`` (a run
    with no env steps, whose line then leaves out steps and returns)."""
    losses = " ".join(
        f"{k.split('/')[-1][5:]}={float(v):.3g}"
        for k, v in logged.items()
        if k.startswith("train/loss_")
    )
    phases = " ".join(
        f"{k.rsplit('/', 1)[-1]}={float(v):.3f}"
        for k, v in logged.items()
        if k.startswith("perf/sec_per_step/")
    )
    if "heldout/world_model" in logged:  # train.heldout_every's validation loss
        losses += f" heldout={float(logged['heldout/world_model']):.3g}"
    if offline:
        head = f"updates {counters['updates']} updates/s {rate:.2f}"
    else:
        head = (
            f"step {counters['env_steps']} updates {counters['updates']} fps {rate:.1f} "
            f"return {shown_return(last_return)}"
        )
    return f"{head} {losses}" + (f" | s/step {phases}" if phases else "")


def shown_return(value: float) -> str:
    """A training return for the log: '-' before any episode has ended (NaN: a fresh or
    resumed run of long episodes), which is not a non-finite value to worry about."""
    return "-" if math.isnan(value) else f"{value:.1f}"


class Every:
    """True once each time a counter passes the next multiple of ``every`` (0: never)."""

    def __init__(self, every: int, start: int):
        self.every = every
        self.next = (start // every + 1) * every if every else math.inf

    def __call__(self, value: int) -> bool:
        if value < self.next:
            return False
        self.next += self.every
        return True


class Means:
    """Running means of the update outputs between two log lines."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, out: TensorDictBase) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def pop(self) -> dict[str, torch.Tensor]:
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


class Phases:
    """Wall seconds spent in each phase of the loop (collect, extend, sample, update,
    write_back, eval, checkpoint), reported per env step: where a run's time goes.

    ``sync``: a CUDA device whose queued work each phase waits for at its start and end
    (``perf.sync=true``). Without it a GPU phase times its kernel launches only — and the
    wait lands in whichever phase next reads a result — but training runs at full speed."""

    def __init__(self, env_steps: int = 0, sync: torch.device | None = None):
        self.seconds: dict[str, float] = {}
        self.since = env_steps  # env step of the last report
        self.sync = sync if sync is not None and sync.type == "cuda" else None

    @contextmanager
    def __call__(self, name: str):
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                torch.cuda.synchronize(self.sync)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self, env_steps: int) -> dict[str, float]:
        """``perf/sec_per_step/<phase>``: seconds per env step since the last report."""
        steps = env_steps - self.since
        out = {f"perf/sec_per_step/{k}": v / max(steps, 1) for k, v in self.seconds.items()}
        self.seconds, self.since = {}, env_steps
        return out


class Rate:
    """Env steps per second since the loop started (this process)."""

    def __init__(self, steps: int):
        self.t0, self.steps0 = time.time(), steps

    def __call__(self, steps: int) -> float:
        return (steps - self.steps0) / max(time.time() - self.t0, 1e-9)


class Cadence:
    """A loop's schedule from ``train.*``, counted on the run's axis from ``start``: when
    to log, evaluate and checkpoint, where it ends (``total``), the running means of the
    update outputs and the step rate."""

    def __init__(self, t, start: int, total: int):
        self.log = Every(t.log_every, start)
        self.eval = Every(t.eval_every, start)
        self.checkpoint = Every(t.checkpoint_every, start)
        self.total, self.means, self.rate = total, Means(), Rate(start)
