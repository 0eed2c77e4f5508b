"""Export a run's stored experience as a Minari dataset:
`make dataset CKPT=<run dir | checkpoint | MLflow run id> OUT=<dir> [ARGS="id=ns/name-v0"]`.

``OUT`` is a Minari datasets root (what ``MINARI_DATASETS_PATH`` names): the dataset lands in
``OUT/<id>/`` (default id ``dreamer_trl/<env>/<run>-step<N>-v0``), holding the complete
episodes of the checkpoint's replay with the env's own observation and action spaces. Minari
then reads it back and every observation and action is checked against those spaces. Train
from it with ``dataset=OUT/<id>`` (or ``MINARI_DATASETS_PATH=OUT`` and ``dataset=<id>``).
Nothing of the run is changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

# option -> (default, help); every option is given as key=value.
OPTIONS: dict[str, tuple[str | None, str]] = {
    "ckpt": (None, "run dir, checkpoint dir, state.pt or MLflow run id (required)"),
    "out": (None, "Minari datasets root to write into (required)"),
    "id": (None, "Minari dataset id, (namespace/)name-v<N> (default: from the run)"),
}


def parse_options(argv: list[str]) -> dict[str, Any]:
    raw = key_values(argv, {key: default for key, (default, _) in OPTIONS.items()})
    for key in ("ckpt", "out"):
        if not raw[key]:
            raise ConfigError(
                f"{key}= is required (make dataset CKPT=runs/<env>/<run> OUT=<datasets dir>)"
            )
    return raw


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    from pipelines.evaluate import locate_checkpoint

    ckpt = locate_checkpoint(opts["ckpt"])
    from dreamer_trl.minari_export import export_minari

    info = export_minari(ckpt, opts["out"], opts["id"])
    skipped = f", {info.skipped} steps of unfinished episodes left out" if info.skipped else ""
    print(
        f"wrote Minari dataset {info.dataset_id}: {info.episodes} episodes, {info.steps} steps"
        f"{skipped} -> {info.path} (train from it: dataset={info.path})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
