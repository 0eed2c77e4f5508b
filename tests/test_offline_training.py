"""train.dataset / train.offline / train.pretrain through the real trainer and entry point
(issue 17 item 3): an earlier run's replay is the dataset."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_pipeline import run_train, tiny  # noqa: E402

from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from dreamer_trl.offline import WORLD_MODEL_LOSSES  # noqa: E402
from dreamer_trl.tracking import Tracker  # noqa: E402
from dreamer_trl.trainer import Trainer  # noqa: E402
from pipelines import train  # noqa: E402
from pipelines.common import compose_config, run_cli  # noqa: E402

OFF = Tracker("offline", run_name="r", enabled=False)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A finished tiny CartPole run whose replay serves as the dataset."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    cfg = compose_config(tiny("cartpole", "train.total_steps=96"))
    Trainer(cfg, run_dir).train(OFF)
    return run_dir


def offline(run_dir: Path, source: Path, *extra: str) -> list[str]:
    return tiny(
        "cartpole",
        "train.offline=true",
        f"train.dataset={source}",
        "train.total_updates=6",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=0",
        f"run_dir={run_dir}",
        "tracking.enabled=false",
        *extra,
    )


def test_offline_run_trains_from_a_run_replay_and_resumes(source_run, tmp_path, capsys):
    run_dir = tmp_path / "off"
    code, out = run_train(capsys, offline(run_dir, source_run))
    assert code == 0, out
    assert "dataset " in out and "steps in replay" in out
    # The log line counts updates and their rate; an offline run has no env steps to show.
    lines = [ln for ln in out.splitlines() if ln.startswith("updates ")]
    assert [ln.split()[1] for ln in lines] == ["2", "4", "6"]
    assert all(ln.split()[2] == "updates/s" and float(ln.split()[3]) > 0 for ln in lines)
    assert "step 0 " not in out and "fps" not in out
    state = load_checkpoint(find_checkpoint(run_dir))
    c = state["counters"]
    # No env steps: updates only, and checkpoints named after them.
    assert (c["env_steps"], c["updates"]) == (0, 6)
    assert find_checkpoint(run_dir).name == "step_6"
    assert c["dataset_steps"] > 96  # the source's steps (plus one final step per episode)
    # A longer budget resumes where it stopped; the dataset is not loaded twice.
    code, out = run_train(capsys, [f"resume={run_dir}", "train.total_updates=8"])
    assert code == 0, out
    assert "steps in replay" not in out
    state = load_checkpoint(find_checkpoint(run_dir))
    assert state["counters"]["updates"] == 8
    assert state["counters"]["dataset_steps"] == c["dataset_steps"]


def test_pretrain_runs_its_updates_before_collection_goes_on(tmp_path):
    cfg = compose_config(tiny("cartpole", "train.pretrain=5", "train.total_steps=64"))
    trainer = Trainer(cfg, tmp_path / "run")
    plain = Trainer(compose_config(tiny("cartpole", "train.total_steps=64")), tmp_path / "b")
    assert trainer.train(OFF)["status"] == "FINISHED"
    assert plain.train(OFF)["status"] == "FINISHED"
    assert trainer.counters["pretrained"] == 5
    # The same collection, 5 more updates: pretraining adds to the ratio's updates.
    assert trainer.counters["updates"] == plain.counters["updates"] + 5
    assert trainer.counters["env_steps"] == plain.counters["env_steps"] == 64


def test_a_bad_dataset_is_one_line_and_leaves_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "off"
    code = run_cli(train.main, offline(run_dir, tmp_path / "nothing-here"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing-here" in err, err
    assert not run_dir.exists()


def test_a_dataset_of_other_spaces_is_refused(source_run, tmp_path, capsys):
    argv = [a.replace("env=cartpole", "env=pendulum") for a in offline(tmp_path / "p", source_run)]
    code = run_cli(train.main, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "recorded on env suite gym task CartPole-v1" in err  # the env it needs
    assert not (tmp_path / "p").exists()


def test_offline_wm_loss_falls(source_run, tmp_path):
    # lr 1e-3 without warm-up: the default ramps lr from 0 over 1000 updates.
    fast = ["train.total_updates=30", "algo.optim.lr=1e-3", "algo.optim.warmup=0"]
    cfg = compose_config(offline(tmp_path / "o", source_run, *fast))
    trainer = Trainer(cfg, tmp_path / "o")
    losses = []  # the world model's loss (the sum of its five terms) per log interval
    trainer._log_interval = lambda tracker, means, fps: losses.append(
        sum(float(means[k]) for k in WORLD_MODEL_LOSSES)
    )
    assert trainer.train(OFF)["status"] == "FINISHED"
    assert len(losses) == 15 and torch.isfinite(torch.tensor(losses)).all()
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


class Recording(Tracker):
    """A disabled tracker that keeps what the trainer logs."""

    def __init__(self):
        super().__init__("offline", run_name="r", enabled=False)
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


def test_heldout_episodes_are_logged_and_refilled_on_resume(source_run, tmp_path, capsys):
    run_dir = tmp_path / "h"
    cfg = compose_config(offline(run_dir, source_run, "train.heldout_every=2"))
    trainer, tracker = Trainer(cfg, run_dir), Recording()
    assert trainer.train(tracker)["status"] == "FINISHED"
    out = capsys.readouterr().out
    held = int(out.split("held out: ")[1].split(" episodes")[0])
    assert out.count(" heldout=") == 3  # on each log line too
    assert held >= 1 and len(trainer.heldout) > 0
    # The training replay lacks exactly the held-out steps: the two split the dataset.
    plain = Trainer(compose_config(offline(tmp_path / "p", source_run)), tmp_path / "p")
    plain._load_stored_experience()
    assert trainer.counters["dataset_steps"] + len(trainer.heldout) == len(plain.replay)
    logs = [(step, m) for step, m in tracker.metrics if "heldout/world_model" in m]
    assert all(m["perf/updates_per_sec"] > 0 and "perf/fps" not in m for _, m in logs)
    assert [step for step, _ in logs] == [2, 4, 6]  # every log_every updates
    for _, m in logs:
        assert m["heldout/world_model"] == pytest.approx(
            sum(m[f"heldout/{k}"] for k in WORLD_MODEL_LOSSES)
        )
    # Resumed: the held-out replay (not checkpointed) is read again, the training one is not.
    longer = compose_config(offline(run_dir, source_run, "train.heldout_every=2",
                                    "train.total_updates=8"))
    capsys.readouterr()
    again = Trainer(longer, run_dir)
    again.load(run_dir)
    assert again.train(OFF)["status"] == "FINISHED" and again.counters["updates"] == 8
    out = capsys.readouterr().out
    assert "steps in replay" not in out and f"held out: {held} episodes" in out
    assert len(again.heldout) == len(trainer.heldout)


def test_heldout_every_needs_a_dataset_and_k_of_at_least_2(tmp_path, capsys):
    for bad in (["train.heldout_every=3"], ["train.heldout_every=1", "train.dataset=x"]):
        code = run_cli(train.main, tiny("cartpole", f"run_dir={tmp_path / 'r'}", *bad))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "train.heldout_every" in err, err


def test_more_ranks_than_training_episodes_is_one_line(source_run, tmp_path):
    from dreamer_trl.datasets import DatasetError
    from dreamer_trl.distributed import World
    from dreamer_trl.trainer import open_stored_experience

    cfg = compose_config(offline(tmp_path / "r", source_run, "train.heldout_every=2"))
    agent = Trainer(compose_config(offline(tmp_path / "a", source_run)), tmp_path / "a").agent
    episodes = open_stored_experience(cfg, agent).episodes  # one process: always fine
    training = episodes - episodes // 2
    assert open_stored_experience(cfg, agent, World(0, training)) is not None
    with pytest.raises(DatasetError) as err:
        open_stored_experience(cfg, agent, World(0, training + 1))
    text = str(err.value)
    assert "\n" not in text and f"has {training} complete training episodes" in text
    assert f"the {training + 1} data-parallel processes" in text and f"NPROC <= {training}" in text
