"""Config values are validated (pipelines/config_schema.py) before a run creates anything:
a bad value exits 2 with one line naming the key, the value and what is valid."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.common import CONF_DIR, ConfigError, compose_config, group_options, run_cli  # noqa: E402
from pipelines.config_schema import (  # noqa: E402
    DTYPES,
    LATENT_DTYPES,
    SUITES,
    schema_defaults,
    schema_keys,
    validate,
)

TRAIN_PY = ROOT / "pipelines" / "train.py"
GROUPS = ("env", "model", "algo")


def train_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """pipelines/train.py in ``tmp_path`` with its run dir and MLflow store under it."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "MUJOCO_GL": "egl", "MLFLOW_TRACKING_URI": store}
    return subprocess.run(
        [
            sys.executable,
            str(TRAIN_PY),
            *argv,
            f"run_dir={tmp_path / 'run'}",
            f"tracking.uri={store}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def flat_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys |= flat_keys(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
    return keys


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "override, shown, valid",
    [
        ("train.batch_size=abc", "train.batch_size=abc", "must be an integer >= 1"),
        ("train.batch_size=0", "train.batch_size=0", "must be an integer >= 1"),
        ("train.train_ratio=-1", "train.train_ratio=-1", "must be a number > 0"),
        ("algo.lam=1.5", "algo.lam=1.5", "must be a number in [0, 1]"),
        ("replay.storage=disk", "replay.storage=disk", "must be one of memmap, tensor"),
        ("device=tpu", "device=tpu", "must be one of auto, cpu, cuda, cuda:N"),
        (
            "replay.capacity=100",
            "replay.capacity=100",
            "must be >= train.batch_size*(train.seq_len+1) = 1040",
        ),
        ("train.seq_len='64'", "train.seq_len='64'", "must be an integer >= 1"),
    ],
    ids=["string", "zero", "negative", "fraction", "choice", "device", "capacity", "quoted"],
)
def test_a_bad_value_exits_2_before_anything_exists(tmp_path, override, shown, valid):
    err = one_line_error(train_cli(tmp_path, "env=cartpole", override))
    assert f"error: {shown} is invalid: {valid}" in err, err
    assert list(tmp_path.iterdir()) == []  # no run dir, no MLflow store, no outputs/


def test_resume_validates_the_merged_overrides(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "overrides.txt").write_text("env=cartpole\ntrain.train_ratio=-1\n")
    err = one_line_error(train_cli(tmp_path, f"resume={run}"))
    assert "train.train_ratio=-1 is invalid" in err  # a bad value saved before validation
    err = one_line_error(
        train_cli(tmp_path, f"resume={run}", "train.train_ratio=2", "train.batch_size=0")
    )
    assert "train.batch_size=0 is invalid" in err  # the new one, merged over the saved ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert [p.name for p in run.iterdir()] == ["overrides.txt"]
    assert (run / "overrides.txt").read_text() == "env=cartpole\ntrain.train_ratio=-1\n"


def test_run_cli_keeps_checkpoint_errors_one_line_and_other_errors_raised(capsys):
    from dreamer_trl.checkpoint import CheckpointError

    def fails(err: Exception):
        def main(argv: list[str]) -> int:
            raise err

        return main

    assert run_cli(fails(CheckpointError("checkpoint x is corrupt")), []) == 2
    assert capsys.readouterr().err == "error: checkpoint x is corrupt\n"
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(fails(RuntimeError("a bug")), [])


# --------------------------------------------------------------------------- shipped configs


@pytest.fixture(scope="module")
def composed() -> dict:
    """The default composition and each group option's node, composed once: Hydra takes
    ~0.2 s a composition, validating ~5 ms."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = OmegaConf.to_container(compose("config"), resolve=True)
        nodes = {
            group: {
                option: OmegaConf.to_container(
                    compose("config", overrides=[f"{group}={option}"])[group], resolve=True
                )
                for option in group_options(group)
            }
            for group in GROUPS
        }
        bench = {b: compose("config", overrides=[f"+bench={b}"]) for b in group_options("bench")}
    return {"base": base, "nodes": nodes, "bench": bench}


def test_every_env_model_algo_combination_is_valid(composed):
    # The groups set disjoint nodes (env, model, algo) and config.yaml sets none of them, so
    # swapping nodes into the default composition is what Hydra composes for each triple.
    nodes = composed["nodes"]
    for options in itertools.product(*(nodes[g] for g in GROUPS)):
        cfg = copy.deepcopy(composed["base"])
        cfg.update({g: nodes[g][o] for g, o in zip(GROUPS, options)})
        try:
            validate(cfg)
        except ConfigError as err:
            pytest.fail(f"{dict(zip(GROUPS, options))}: {err}")


def test_every_bench_preset_is_valid(composed):
    for preset, cfg in composed["bench"].items():
        try:
            validate(cfg)  # with its interpolations (reference.file) resolved
        except ConfigError as err:
            pytest.fail(f"+bench={preset}: {err}")
    compose_config(["+bench=dmc_walker"])  # and through the entry points' composition


def test_every_key_of_conf_has_a_schema_entry(composed):
    """A key added to conf/ without a schema entry (or a schema entry conf/ lost) fails here."""
    known = set(schema_keys())
    optional = {k for k, meta in schema_keys().items() if meta.get("optional")}
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    yaml = {k: v for k, v in yaml.items() if k not in ("defaults", "hydra")}
    assert flat_keys(yaml) - known == set()
    for group, options in composed["nodes"].items():
        for option, node in options.items():
            assert flat_keys(node, f"{group}.") - known == set(), f"{group}={option}"
    assert known - optional - flat_keys(composed["base"]) == set()


def test_schema_defaults_are_the_default_composition(composed):
    defaults, base = schema_defaults(), composed["base"]
    # Besides env.*, the default env's preset sets a few keys of its own (dmc_walker: the
    # reference's 16 envs); the schema's defaults for those are config.yaml's.
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "env" / "dmc_walker.yaml"))
    by_env = {f"{g}.{k}" for g, sub in preset.items() if g != "env" for k in sub}
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))

    def compare(ours: dict, theirs: dict, path: str) -> None:
        for key, value in theirs.items():
            if isinstance(value, dict):
                compare(ours[key], value, f"{path}{key}.")
            elif f"{path}{key}" in by_env:
                group, name = f"{path}{key}".split(".")
                assert ours[key] == yaml[group][name], f"{path}{key}: schema vs config.yaml"
            else:
                assert ours[key] == value, f"{path}{key}: schema {ours[key]!r}, conf {value!r}"

    compare(defaults, base, "")
    validate(defaults)  # and they are valid themselves


def test_a_key_without_a_schema_entry_is_refused(composed):
    cfg = copy.deepcopy(composed["base"])
    cfg["replay"]["prefetch_depth"] = 2
    with pytest.raises(ConfigError, match="unknown config key 'replay.prefetch_depth'; valid keys"):
        validate(cfg)
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        compose_config(["+train.nope=1"])  # added with '+', which Hydra lets through


def test_keys_older_configs_lack_and_keys_others_add(composed):
    cfg = copy.deepcopy(composed["base"])
    del cfg["replay"]["latent_dtype"], cfg["resume_fallback"]
    validate(cfg)  # configs saved before those keys
    for value in (True, False):
        cfg["tracking"]["continue"] = value
        cfg["resume_fallback"] = value
        validate(cfg)
    cfg["tracking"]["continue"] = "yes"
    with pytest.raises(
        ConfigError, match=r"^tracking.continue='?yes'? is invalid: must be true or"
    ):
        validate(cfg)
    for dtype in LATENT_DTYPES:
        validate(edited(composed["base"], {"replay.latent_dtype": dtype}))
    validate(edited(composed["base"], {"env.obs_keys": ["observation"]}))


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"train.train_start": 10}, "train.train_start=10 is invalid: must be >= train.seq_len+1"),
        (
            {"train.train_start": 2000, "replay.capacity": 1500},
            "replay.capacity=1500 is invalid: must be >= train.train_start = 2000",
        ),
        ({"replay.device": "cuda"}, "replay.device=cuda is invalid: needs replay.storage=tensor"),
        ({"model.deter": 100}, "model.deter=100 is invalid: must be divisible by model.blocks=8"),
        ({"env.task": "walker"}, "env.task=walker is invalid: must be 'domain-task'"),
        ({"env.image_size": 32}, "env.image_size=32 is invalid: must be an integer in [48, 271]"),
        ({"train.log_every": 0}, "train.log_every=0 is invalid: must be an integer >= 1"),
        ({"eval.video": ""}, "eval.video='' is invalid: must be true or false"),
        ({"compile.mode": "fast"}, "compile.mode=fast is invalid: must be one of default, "),
        ({"algo.optim.lr": 0}, "algo.optim.lr=0 is invalid: must be a number > 0"),
        ({"algo.loss_scales": 3}, "algo.loss_scales=3 is invalid: must be a mapping of rec, "),
        ({"train.train_ratio": float("inf")}, "train.train_ratio=inf is invalid: must be a number"),
        ({"train.batch_size": True}, "train.batch_size=true is invalid: must be an integer"),
        ({"train.batch_size": 16.0}, "train.batch_size=16.0 is invalid: must be an integer"),
        ({"replay.latent_dtype": "int8"}, "replay.latent_dtype=int8 is invalid: must be one of"),
        ({"env.obs_keys": [1]}, "env.obs_keys=[1] is invalid: must be a list of strings or null"),
    ],
)
def test_relations_and_edge_values(composed, edits, message):
    """Values as Hydra parses them from the command line, set on the default composition."""
    with pytest.raises(ConfigError) as err:
        validate(edited(composed["base"], edits))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def edited(cfg: dict, edits: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def test_valid_edge_values_pass():
    compose_config(
        [
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.train_ratio=0.5",
            "algo.lam=1",
            "env.max_episode_steps=100",
            "compile.mode=max-autotune",
            "device=cpu",
            "train.train_start=65",
            "replay.capacity=1040",
            "replay.storage=tensor",
        ]
    )


def test_the_schema_choices_are_the_librarys():
    # Repeated in config_schema so that validating imports no torch; kept equal here.
    import torch

    from dreamer_trl import envs, precision, replay

    assert SUITES == envs.SUITES
    assert set(precision.DTYPES) == set(DTYPES)
    for name in LATENT_DTYPES:
        assert replay._dtype(name) == getattr(torch, name)


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks a CPU-only torch's message"
)
def test_cuda_without_a_cuda_device_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"^device=cuda:1 is invalid: torch .* sees no CUDA"):
        compose_config(["device=cuda:1"])
    with pytest.raises(ConfigError, match=r"^collector.device=cuda is invalid"):
        compose_config(["collector.device=cuda"])
