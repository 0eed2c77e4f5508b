"""Train DreamerV3: `make train ENV=dmc_walker [ARGS="hydra overrides"]`.

A run lives in ``run_dir`` (config, checkpoints, replay) and in one MLflow run; each knows
the other (the checkpoint stores the MLflow run id, the run's ``run_dir`` tag the dir).
``resume=<run dir | checkpoint dir | MLflow run id>`` continues it where it stopped. A run dir
resumed from another place than its run's ``run_dir`` tag (copied or moved) gets a new MLflow
run tagged ``resumed_from=<the old id>``, unless ``tracking.continue=true``; the old run's tags
are left as they are.

Every exit leaves a true record:

* finished: one ``finished: ...`` line, MLflow run FINISHED, exit 0; the run's policy is
  logged as its MLflow model ``policy`` (pyfunc over the ONNX export; ``tracking.register=
  <name>`` registers it, ``tracking.log_model=false`` skips it);
* stopped (Ctrl-C or SIGTERM, at any moment): one ``stopped: ...`` line and no traceback,
  exit 130; MLflow run KILLED and resumable from its latest checkpoint, or, stopped before
  its first checkpoint, tagged ``checkpoint=none ...`` with its run dir removed;
* crashed: the traceback on stderr, then one ``error: ...`` line, exit 1; MLflow run FAILED
  with an ``error`` tag (``Type: message``) and the traceback as artefact ``error.txt``
  (a checkpoint or config error mid-run: the same record, but one line and exit 2);
* bad input before the run began: one ``error: ...`` line, exit 2, nothing written.

Under ``torchrun`` (``make train NPROC=2``) each process is one data-parallel rank
(``dreamer_trl.distributed``): rank 0 picks the run dir, writes the config and the MLflow
run, evaluates and prints; ranks > 0 print errors only. A stop saves nothing new: the run
resumes (with the same NPROC) from its latest periodic checkpoint.

The run dir is created only once the env and the agent are built.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OVERRIDES_FILE = "overrides.txt"
CONTINUE_KEY = "tracking.continue="
EXIT_STOPPED = 130  # what a shell reports for a process ended by SIGINT
ERROR_TAG_CHARS = 500  # the ``error`` tag: enough for a message, the traceback is error.txt


def _stop_before_main(*_: Any) -> None:
    # Nothing is written before main() runs: leave at once, with the one line a stop prints.
    print("stopped: during start-up; nothing recorded", flush=True)
    os._exit(EXIT_STOPPED)


if __name__ == "__main__":  # before the imports below (hydra, ~1 s on a busy machine)
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stop_before_main)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.common import ConfigError, compose_config, run_cli  # noqa: E402


def resolve_run_dir(resume: str, uri: str | None) -> Path:
    """A run dir from a path (run dir or one of its checkpoints) or an MLflow run id."""
    path = Path(resume)
    if path.exists():
        for cand in (path, *path.parents):
            if (cand / OVERRIDES_FILE).exists():
                return cand
        raise ConfigError(f"resume={resume!r} is not inside a run dir (no {OVERRIDES_FILE})")
    from dreamer_trl.tracking import run_dir_of

    found = run_dir_of(resume, uri)
    if found is None:
        raise ConfigError(
            f"resume={resume!r} is neither a path nor an MLflow run id with a run dir"
        )
    if not (Path(found) / OVERRIDES_FILE).exists():  # moved or deleted since
        raise ConfigError(
            f"MLflow run {resume}'s run dir {found} is gone; resume=<its path> if it was moved"
        )
    return Path(found)


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """``saved`` then ``new``, dropping a saved override whose key ``new`` sets again."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in saved if o.split("=", 1)[0] not in keys] + new


def save_overrides(run_dir: Path, overrides: list[str]) -> None:
    (run_dir / OVERRIDES_FILE).write_text("\n".join(overrides) + "\n")


def name_after_task(overrides: list[str]) -> list[str]:
    """``env.task=Acrobot-v1`` on the cartpole config names the run dir, the experiment and
    the plots after the task (``acrobot_v1``), not after the config; ``env.name=`` wins."""
    keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("env.task=")), None)
    if task is None or "env.name" in keys:
        return overrides
    name = re.sub(r"[^0-9a-z]+", "_", task.lower()).strip("_")  # a path and experiment name
    return [*overrides, f"env.name={name}"] if name else overrides


# --------------------------------------------------------------------------- signals


def install_stop_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt (a stop the pipeline records).

    Here rather than dreamer_trl.trainer's equivalent: that import loads torch (~10 s), and
    a stop while it loads must be clean too. SIGINT is (re)installed as well: a shell starts
    background jobs (``cmd &``) with SIGINT ignored, which would make ``kill -INT`` a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _redeliver_lost_stop


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _redeliver_lost_stop(unraisable: Any) -> None:
    """A stop whose KeyboardInterrupt was raised where Python cannot raise (a signal handler
    runs at any bytecode, and lands in a weakref callback or ``__del__`` now and then:
    inductor's caches run those while compiling) is printed and dropped, and the run goes
    on training. Send it again, a moment later from a thread: sent from here, its handler
    would run inside this hook and be dropped again."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
        return
    while True:
        try:
            again = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT))
            again.daemon = True
            again.start()
            return
        except KeyboardInterrupt:  # it (or another stop) came while still in here
            continue


@contextmanager
def deferred_stop(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM until the block is done: MLflow writes (create the run, record
    how it ended) are short, and one cut in half leaves a run that claims to be RUNNING for
    ever. With ``reraise`` a stop that arrived meanwhile is raised after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {
        sig: signal.signal(sig, lambda n, _: held.append(n))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if held and reraise:
        raise KeyboardInterrupt


# --------------------------------------------------------------------------- the run


class TrainRun:
    """One invocation: what exists so far (run dir, trainer, MLflow run), so that however
    it ends, the record says what happened and what can be resumed."""

    def __init__(self, argv: list[str]) -> None:
        self.resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
        self.overrides = [a for a in argv if not a.startswith("resume=")]
        self.run_dir: Path | None = None
        self.made: Path | None = None  # the outermost dir this process created for run_dir
        self.trainer: Any = None
        self.tracker: Any = None
        self.world: Any = None  # dreamer_trl.distributed.World, once the config is known

    # ---- the happy path ----------------------------------------------------------
    def run(self) -> int:
        overrides = self.overrides
        if self.resume:
            probe = compose_config([o for o in overrides if o.startswith("tracking.")])
            self.run_dir = resolve_run_dir(self.resume, probe.tracking.uri)
            saved = (self.run_dir / OVERRIDES_FILE).read_text().split()
            overrides = merge_overrides(saved, overrides)
        cfg = compose_config(name_after_task(overrides))
        world = self.world = join_world(cfg)
        if not self.resume:
            stamp = time.strftime("%Y%m%d_%H%M%S")
            self.run_dir = Path(cfg.run_dir or f"runs/{cfg.env.name}/{stamp}_seed{cfg.seed}")
            if world.multi:  # the ranks' clocks may disagree on the stamp: rank 0's name
                from dreamer_trl.distributed import broadcast_object

                self.run_dir = broadcast_object(self.run_dir, world)
        run_dir = self.run_dir
        self.made = _first_missing(run_dir) if world.main else None  # rank 0's to remove

        from dreamer_trl.trainer import Trainer, config_params

        # Builds the env and the agent before it writes anything (the replay scratch dir,
        # which creates run_dir): a bad env id or model leaves no run dir.
        trainer = self.trainer = Trainer(cfg, run_dir, world)
        if not world.main:
            return self.run_other_rank(cfg)
        if self.resume:  # a refused checkpoint (other model size, corrupt) raises before any write
            trainer.load(run_dir)
            print(f"resumed {run_dir} at env step {trainer.counters['env_steps']}", flush=True)
        # On resume kept only once the checkpoint is accepted, so that a later plain resume
        # repeats them (a longer budget, another thread count) instead of dropping them.
        # tracking.continue is not: it decides this resume only, not what a copy of the dir
        # would do.
        save_overrides(run_dir, [o for o in overrides if not o.startswith(CONTINUE_KEY)])
        OmegaConf.save(cfg, run_dir / "config.yaml")

        run_id, tags = self.mlflow_identity(cfg, run_dir, trainer.mlflow_run_id)
        from dreamer_trl.tracking import Tracker

        with deferred_stop():
            self.tracker = Tracker(
                cfg.tracking.experiment or cfg.env.name,
                run_name=run_dir.name,
                tracking_uri=cfg.tracking.uri,
                run_id=run_id,
                enabled=cfg.tracking.enabled,
                tags=tags,
            )
        tracker = self.tracker
        trainer.mlflow_run_id = tracker.run_id
        if run_id is None:  # a new MLflow run (a new run dir, or a copied one resumed)
            tracker.log_params(config_params(cfg))
            tracker.log_artifact(run_dir / "config.yaml")
        print(
            f"run dir {run_dir} | mlflow run {tracker.run_id} | {trainer.agent.num_params():,} "
            f"params | device {trainer.device}",
            flush=True,
        )
        result = trainer.train(tracker)
        if trainer.returns:
            from dreamer_trl.tracking import plot_learning_curve, reference_overlay

            steps, rets = zip(*trainer.returns)
            ref = cfg.reference
            overlay = reference_overlay(ref.file, ref.task, until=cfg.train.total_steps * 1.05)
            png = plot_learning_curve(
                steps, rets, reference=overlay, title=cfg.env.name,
                path=run_dir / "learning_curve.png",
            )
            tracker.log_artifact(png)
        if result["status"] == "NONFINITE":  # NaN/inf guard stopped it; the latest ckpt is finite
            tracker.close("FAILED")
            print(f"error: {result['error']}", file=sys.stderr, flush=True)
            return 3  # exit codes: 1 crash, 2 bad input, 3 non-finite, 130 stopped
        if result["status"] != "FINISHED":
            return self.stopped(result["checkpoint"])
        if tracker.enabled and cfg.tracking.get("log_model", True):
            self.log_model(cfg, result["checkpoint"])
        with deferred_stop(reraise=False):
            tracker.set_tags({"checkpoint": result["checkpoint"]})
            tracker.close("FINISHED")
            print(
                f"finished: {result['env_steps']} env steps, {result['updates']} updates; "
                f"checkpoint {result['checkpoint']}",
                flush=True,
            )
        return 0

    def run_other_rank(self, cfg: DictConfig) -> int:
        """A rank > 0: the same loop, unlogged (rank 0 writes the run's record)."""
        from dreamer_trl.tracking import Tracker

        self.tracker = Tracker(cfg.env.name, enabled=False)
        if self.resume:
            self.trainer.load(self.run_dir)
        result = self.trainer.train(self.tracker)
        if result["status"] == "NONFINITE":
            return 3
        return 0 if result["status"] == "FINISHED" else self.stopped(result["checkpoint"])

    def log_model(self, cfg: DictConfig, checkpoint: str) -> None:
        """The finished run's policy as its MLflow model ``policy`` (registered as
        ``tracking.register`` when set). The training finished whatever happens here: a
        failure is a warning, and the run is still recorded FINISHED."""
        try:
            from dreamer_trl.export import log_policy_model
            from dreamer_trl.inference import load_policy

            policy = load_policy(checkpoint)
            info = log_policy_model(
                policy, self.tracker.run_id, self.tracker.tracking_uri, cfg.tracking.get("register")
            )
        except Exception as err:  # e.g. onnx not installed: pip install -e '.[export]'
            print(f"warning: policy not logged as an MLflow model: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            return
        version = info.registered_model_version
        named = f"; registered as models:/{cfg.tracking.register}/{version}" if version else ""
        print(f"MLflow model runs:/{self.tracker.run_id}/policy{named}", flush=True)

    def mlflow_identity(
        self, cfg: DictConfig, run_dir: Path, saved_id: str | None
    ) -> tuple[str | None, dict[str, str]]:
        """The MLflow run to log into (None: a new one) and the tags to set on it.

        A resumed run dir continues its own run only where that run says it lives (its
        ``run_dir`` tag): a copy (or a moved dir) resumed elsewhere is another run, so it gets
        a new one, tagged ``resumed_from``, and the original's tags stay as they are.
        ``tracking.continue=true`` continues the original anyway (and re-points its tag: the
        run has moved).
        """
        here = str(run_dir.resolve())
        if saved_id is None or not cfg.tracking.enabled:
            return saved_id, {"run_dir": here}
        from dreamer_trl.tracking import run_tags

        tags = run_tags(saved_id, cfg.tracking.uri)
        if tags is None:  # not in this store: a run dir from another machine or store
            print(f"MLflow run {saved_id} is not in this store: resuming into a new run")
            return None, {"run_dir": here, "resumed_from": saved_id}
        where = tags.get("run_dir")
        if where is None or Path(where) == Path(here) or cfg.tracking.get("continue"):
            return saved_id, {"run_dir": here}
        print(
            f"{run_dir} is a copy of {where} (MLflow run {saved_id}): resuming into a new MLflow "
            f"run (tracking.continue=true continues {saved_id} instead)",
            flush=True,
        )
        return None, {"run_dir": here, "resumed_from": saved_id}

    # ---- the other endings -------------------------------------------------------
    def stopped(self, checkpoint: str | None = None) -> int:
        """Ctrl-C / SIGTERM: record it (KILLED) and print one line; exit 130."""
        with deferred_stop(reraise=False):  # a second Ctrl-C must not cut the record short
            checkpoint = checkpoint or self.latest_checkpoint()
            if self.tracker is None:
                self.remove_run_dir()
                if self.resume and self.run_dir is not None:
                    line = f"before resuming {self.run_dir}; its checkpoints are unchanged"
                else:
                    line = "during start-up; nothing recorded"
            elif checkpoint is None:
                gone = self.remove_run_dir()
                note = "stopped before the first checkpoint" + ("; run dir removed" if gone else "")
                self._record("KILLED", {"checkpoint": f"none: {note}"})
                line = f"before the first checkpoint, nothing to resume{self._where(gone)}"
            else:
                self._record("KILLED", {"checkpoint": checkpoint})
                c = self.trainer.counters
                line = (
                    f"{c['env_steps']} env steps, {c['updates']} updates; checkpoint "
                    f"{checkpoint} (resume={self.run_dir})"
                )
            print(f"stopped: {line}", flush=True)
        return EXIT_STOPPED

    def crashed(self, err: Exception) -> int:
        """An exception once the MLflow run exists: FAILED with the error and traceback."""
        text = "".join(traceback.format_exception(err))
        summary = " ".join(f"{type(err).__name__}: {err}".split())[:ERROR_TAG_CHARS]
        if self.world is not None and self.world.multi:
            from dreamer_trl.distributed import lost_peer

            if lost_peer(err):  # not this rank's fault: say whose, keep the trace in MLflow
                return self.lost_peer(text)
        with deferred_stop(reraise=False):
            checkpoint = self.latest_checkpoint()
            gone = checkpoint is None and self.remove_run_dir()
            if checkpoint is None:
                checkpoint = "none: failed before the first checkpoint" + (
                    "; run dir removed" if gone else ""
                )
            self._record("FAILED", {"error": summary, "checkpoint": checkpoint}, text)
            if _one_line_error(err):  # a stop the code decided on (disk full, ...): run_cli
                raise err  # prints its one line
            sys.stderr.write(text)  # a real crash: users need the traceback
            run = (
                f"; MLflow run {self.tracker.run_id} FAILED, traceback in its error.txt"
                if self.tracker.enabled
                else ""
            )
            print(f"error: {summary}{run}", file=sys.stderr, flush=True)
        return 1

    def lost_peer(self, text: str) -> int:
        """This rank's collective failed because another rank died or was stopped: FAILED,
        one line (the dead rank's own error, and torchrun's summary naming it, are its)."""
        with deferred_stop(reraise=False):
            checkpoint = self.latest_checkpoint() or "none"
            summary = (f"rank {self.world.rank} lost a peer: another rank of the "
                       f"{self.world.size}-process job died or was stopped (torchrun's failure "
                       f"summary names it)")
            self._record("FAILED", {"error": summary, "checkpoint": checkpoint}, text)
            print(f"error: {summary}; resume from {checkpoint}", file=sys.stderr, flush=True)
        return 1

    def _record(self, status: str, tags: dict[str, str], error: str | None = None) -> None:
        try:
            self.tracker.set_tags(tags)
            if error is not None:
                self.tracker.log_text(error, "error.txt")
            self.tracker.close(status)
        except Exception as err:  # e.g. the store is gone: say so, keep the exit's meaning
            print(f"warning: MLflow not updated ({status}): {err}", file=sys.stderr, flush=True)

    def _where(self, removed: bool) -> str:
        parts = ["run dir removed"] if removed else []
        if self.tracker is not None and self.tracker.enabled:
            parts.append(f"MLflow run {self.tracker.run_id} KILLED")
        return f" ({'; '.join(parts)})" if parts else ""

    def latest_checkpoint(self) -> str | None:
        """The checkpoint a resume would load, or None (none yet, or no trainer: torch and
        the checkpoint module are loaded only with it)."""
        if self.trainer is None or self.run_dir is None:
            return None
        from dreamer_trl.checkpoint import CheckpointError, find_checkpoint

        try:
            return str(find_checkpoint(self.run_dir))
        except CheckpointError:
            return None

    def remove_run_dir(self) -> bool:
        """Remove the run dir if this process created it (and the empty parents it made);
        one that existed before (a resume, an explicit run_dir=) is kept."""
        if self.made is None or self.run_dir is None or not self.run_dir.exists():
            return False
        run_dir = self.run_dir.absolute()
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        while self.made in (parent, *parent.parents) and parent.exists():
            try:
                parent.rmdir()  # only if empty: another run may have appeared there meanwhile
            except OSError:
                break
            parent = parent.parent
        return not run_dir.exists()


def join_world(cfg: DictConfig) -> Any:
    """This process's data-parallel world (one process unless ``torchrun`` started it),
    joined; ranks > 0 print nothing to stdout (their errors still reach stderr)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from dreamer_trl.distributed import SINGLE

        return SINGLE
    from dreamer_trl.distributed import init_world, launched_world
    from dreamer_trl.trainer import resolve_device

    world = launched_world()
    init_world(world, resolve_device(cfg.device))
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
    return world


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: it exists)."""
    if path.exists():
        return None
    missing = path
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing = parent
    return missing.absolute()


def _one_line_error(err: Exception) -> bool:
    """Errors whose message is the whole story (run_cli prints it, exit 2): a config error,
    or a checkpoint error (a refused checkpoint, the disk-full stop)."""
    ckpt = sys.modules.get("dreamer_trl.checkpoint")
    return isinstance(err, ConfigError) or (
        ckpt is not None and isinstance(err, ckpt.CheckpointError)
    )


def main(argv: list[str]) -> int:
    install_stop_signals()
    run = TrainRun(argv)
    try:
        return run.run()
    except KeyboardInterrupt:
        return run.stopped()
    except Exception as err:
        if run.tracker is None:  # nothing recorded yet: leave nothing behind either
            with deferred_stop(reraise=False):
                run.remove_run_dir()
            raise  # run_cli: bad input is one line (exit 2), anything else its traceback
        return run.crashed(err)


if __name__ == "__main__":
    code = run_cli(main)
    # Decided and recorded: a Ctrl-C during the interpreter's teardown (worker processes,
    # atexit hooks) ends it at once with that code instead of a traceback.
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda *_: os._exit(code))
    sys.exit(code)
