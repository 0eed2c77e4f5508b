"""Config composition for the entry points: Hydra's compose API over conf/, with
one-line errors for unknown groups, options and keys (instead of Hydra tracebacks)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A bad command-line override; the message is one line naming the valid choices."""


def key_values(argv: list[str], defaults: dict) -> dict:
    """``key=value`` arguments over ``defaults`` (values stay strings); ConfigError (one
    line) for anything else."""
    raw = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            valid = ", ".join(defaults)
            raise ConfigError(f"unknown option {arg!r}; valid options (key=value): {valid}")
        raw[key] = value
    return raw


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if (CONF_DIR / key).is_dir() and value and value not in group_options(key):
            raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(group_options(key))}")


def _valid_keys(cfg: DictConfig, dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig):
        where = f" under '{parent}'" if parent else ""
        return f"valid keys{where}: {', '.join(str(k) for k in node.keys())}"
    return f"'{parent}' is not a mapping"


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with ``overrides`` and validate every value against
    pipelines/config_schema.py; raise ConfigError (one line) on bad input. Every entry point
    composes through here, before it creates a run dir, an MLflow run or replay files."""
    # Imported here: config_schema imports ConfigError from this module.
    from pipelines.config_schema import validate

    cfg = _compose(overrides, config_name)
    validate(cfg)
    return cfg


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    _check_group_choices(overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name, overrides=overrides)
        except (ConfigCompositionException, MissingConfigException) as err:
            base = compose(
                config_name,
                overrides=[
                    o for o in overrides if "=" in o and o.split("=")[0] in ("env", "model", "algo")
                ],
            )
            bad = _first_bad_key(base, overrides)
            if bad:
                raise ConfigError(f"unknown config key {bad!r}; {_valid_keys(base, bad)}") from None
            raise ConfigError(str(err).splitlines()[0]) from None


def _first_bad_key(cfg: DictConfig, overrides: list[str]) -> str | None:
    for item in overrides:
        key = item.lstrip("+~").split("=")[0]
        if item.startswith(("+", "~")) or (CONF_DIR / key).is_dir():
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            return key
    return None


def run_cli(main, argv: list[str] | None = None) -> int:
    """Call ``main(overrides)``; bad input (config, checkpoint, env spec) exits 2 with one line."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv) or 0
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # CheckpointError is a RuntimeError. Not imported up front: dreamer_trl imports
        # torch (~10 s on a busy box), which a bad config value need not wait for; an error
        # raised by that module means it is loaded already.
        ckpt = sys.modules.get("dreamer_trl.checkpoint")
        if ckpt is None or not isinstance(err, ckpt.CheckpointError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
