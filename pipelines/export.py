"""Export a trained policy's acting step: `make export CKPT=<checkpoint dir | run dir | MLflow
run id | models:/name/version> FORMAT=onnx|torchscript|pt2 [OUT=<file>]`.

The step (encoder + RSSM posterior step + actor; recurrent state in and out, the sampling
noise as inputs: see dreamer_trl/export.py) is written to ``out`` (default: ``policy.onnx``,
``policy.pt`` or ``policy.pt2`` in the checkpoint dir), then run on example inputs beside
the eager step, sampled and deterministic (``verify=false`` skips that); one line reports
the file and the largest difference. Bad input exits 2 with one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

FORMATS = ("onnx", "torchscript", "pt2")  # dreamer_trl.export.FORMATS (no torch import here)
OPTIONS = {
    "ckpt": None,
    "format": "onnx",
    "out": None,
    "verify": "true",
}
TOLERANCE = 1e-5


def parse_options(argv: list[str]) -> dict[str, Any]:
    raw = key_values(argv, OPTIONS)
    if not raw["ckpt"]:
        raise ConfigError(
            "ckpt=<checkpoint dir | run dir | MLflow run id | models:/name/version> is required "
            "(make export CKPT=runs/<env>/<run> FORMAT=onnx)"
        )
    if raw["format"] not in FORMATS:
        raise ConfigError(f"unknown format {raw['format']!r}; valid: {', '.join(FORMATS)}")
    if raw["verify"].lower() not in ("true", "false"):
        raise ConfigError(f"verify must be true or false, got {raw['verify']!r}")
    return {**raw, "verify": raw["verify"].lower() == "true"}


def default_out(policy: Any, fmt: str) -> Path:
    """``policy.<ext>`` beside the checkpoint's state.pt (the cwd for an MLflow source)."""
    from dreamer_trl.export import FORMATS as SUFFIXES

    where = Path(policy.source)
    folder = where if where.is_dir() else Path.cwd()
    return folder / f"policy{SUFFIXES[fmt]}"


def max_difference(policy: Any, path: Path, fmt: str) -> float:
    """Largest |export - eager| over the outputs, at batch 3, sampled and deterministic."""
    import numpy as np
    import torch

    from dreamer_trl.export import example_inputs, input_names

    worst = 0.0
    for deterministic in (False, True):
        args = example_inputs(policy, batch=3, seed=1)[:-1] + (torch.tensor(deterministic),)
        with torch.no_grad():
            want = [x.cpu().numpy() for x in policy.step(*args)]
        got = _run(path, fmt, input_names(policy), args)
        for a, b in zip(want, got):
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    return worst


def _run(path: Path, fmt: str, names: list[str], args: tuple) -> list:
    import torch

    if fmt == "onnx":
        from dreamer_trl.onnx_policy import OnnxPolicy

        session = OnnxPolicy(path).session
        return session.run(None, {n: a.cpu().numpy() for n, a in zip(names, args)})
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path))
    module = module if fmt == "torchscript" else module.module()
    with torch.no_grad():
        return [x.cpu().numpy() for x in module(*args)]


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    from dreamer_trl.export import export_policy
    from dreamer_trl.inference import load_policy

    policy = load_policy(opts["ckpt"])
    out = Path(opts["out"]).expanduser() if opts["out"] else default_out(policy, opts["format"])
    export_policy(policy, out, opts["format"])
    check = ""
    if opts["verify"]:
        diff = max_difference(policy, out, opts["format"])
        if diff > TOLERANCE:
            print(f"error: the export at {out} differs from the eager step by {diff:.2e}",
                  file=sys.stderr)
            return 1
        check = f"; matches the eager step to {diff:.1e}"
    size = out.stat().st_size / 2**20
    print(
        f"exported {policy.source} ({policy.config.get('env', {}).get('name')}, "
        f"{policy.env_steps} env steps) as {opts['format']} -> {out} ({size:.1f} MiB{check})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
