"""Export a policy's acting step, and log a policy as an MLflow model.

The exported graph is :class:`~dreamer_trl.inference.ActingStep`: encoder, one RSSM
posterior step and the actor, with the recurrent state in and out and the sampling noise as
inputs, so a run of the export reproduces the eager step exactly. Formats:

* ``onnx`` — ``torch.onnx.export(dynamo=True)``; runs in onnxruntime without torch
  (``dreamer_trl/onnx_policy.py`` is a numpy runner for it);
* ``torchscript`` — ``torch.jit.trace``; ``torch.jit.load`` needs torch only;
* ``pt2`` — ``torch.export``; ``torch.export.load`` needs torch only.

Inputs, batch B first (at most :data:`MAX_BATCH` for ``onnx``/``pt2``): each observation
key (as ``Policy.obs_keys``), ``deter`` [B, D], ``stoch`` [B, S, C], ``prev_action`` [B, A],
``is_first`` bool [B], ``stoch_noise`` uniform [B, S], ``action_noise`` (uniform [B, 1] for
discrete actions, standard normal [B, A] for continuous ones), ``deterministic`` bool [].
Outputs: ``action`` (the env's: int64 index [B] or float32 [B, A] in its bounds) and the
next ``deter``, ``stoch``, ``prev_action``. Every file carries the same description as JSON
(:func:`describe`): ONNX metadata ``dreamer_trl``, an extra file ``dreamer_trl.json`` in
TorchScript and pt2 archives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import save_checkpoint
from .inference import MLFLOW_CHECKPOINT, MLFLOW_MODEL, Policy, policy_state, temporary_env

__all__ = [
    "FORMATS",
    "MAX_BATCH",
    "describe",
    "example_inputs",
    "export_policy",
    "input_names",
    "log_policy_model",
    "read_metadata",
]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
STATE_KEYS = ("deter", "stoch", "prev_action", "is_first")
NOISE_KEYS = ("stoch_noise", "action_noise", "deterministic")
OUTPUT_NAMES = ("action", "next_deter", "next_stoch", "next_prev_action")
# block_matmul takes another kernel from 256 rows on: an export traces one of them.
MAX_BATCH = 255
META_KEY, META_FILE = "dreamer_trl", "dreamer_trl.json"
ONNX_FILE = "policy.onnx"


def input_names(policy: Policy) -> list[str]:
    names = [*policy.obs_keys, *STATE_KEYS, *NOISE_KEYS]
    clash = set(policy.obs_keys) & set(STATE_KEYS + NOISE_KEYS + OUTPUT_NAMES)
    if clash:
        raise ValueError(
            f"observation keys {sorted(clash)} clash with the export's state/noise names "
            f"{[*STATE_KEYS, *NOISE_KEYS]}; rename them in the env"
        )
    return names


def example_inputs(policy: Policy, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs of the acting step for ``batch`` envs: random observations, a fresh state,
    noise from a seeded generator, ``deterministic`` False."""
    gen = torch.Generator().manual_seed(seed)
    dev = policy.device
    obs = [_example_obs(policy, key, batch, gen).to(dev) for key in policy.obs_keys]
    stoch_shape, action_shape = policy.step.noise_shapes(batch)
    draw = torch.rand if policy.action_space.discrete else torch.randn
    noise = (torch.rand(stoch_shape, generator=gen), draw(action_shape, generator=gen))
    flag = torch.tensor(False, device=dev)
    return (*obs, *policy.initial_state(batch), *(n.to(dev) for n in noise), flag)


def _example_obs(policy: Policy, key: str, batch: int, gen: torch.Generator) -> Tensor:
    space = policy.obs_space
    if key in space.images:
        return torch.randint(0, 256, (batch, *space.images[key]), generator=gen).to(torch.uint8)
    if key in space.integers:
        ints = space.integers[key]
        classes = torch.tensor(ints.classes, dtype=torch.float64)
        draw = torch.rand(batch, ints.size, generator=gen, dtype=torch.float64)
        return torch.tensor(ints.low) + (draw * classes).long()
    return torch.randn(batch, space.vectors[key], generator=gen)


def describe(policy: Policy) -> dict[str, Any]:
    """What a runner needs to feed an export: inputs, outputs, spaces (JSON-able)."""
    inputs = [
        {
            "name": name,
            "shape": ["B", *x.shape[1:]] if x.dim() else [],
            "dtype": str(x.dtype).removeprefix("torch."),
        }
        for name, x in zip(input_names(policy), example_inputs(policy, 1))
    ]
    env = policy.config.get("env") or {}
    return {
        "format_version": 1,
        "inputs": inputs,
        "outputs": list(OUTPUT_NAMES),
        "obs_keys": policy.obs_keys,
        "noise": {
            "stoch_noise": "uniform",
            "action_noise": "uniform" if policy.action_space.discrete else "normal",
        },
        "action_space": {
            "discrete": policy.action_space.discrete,
            "dim": policy.action_space.dim,
            "low": policy.action_space.low,
            "high": policy.action_space.high,
        },
        "max_batch": MAX_BATCH,
        "env": {k: env.get(k) for k in ("name", "suite", "task", "action_repeat") if k in env},
        "env_steps": policy.env_steps,
        "source": policy.source,
    }


def export_policy(policy: Policy, out: str | Path, format: str = "onnx") -> Path:
    """Write the acting step to ``out`` as ``onnx``, ``torchscript`` or ``pt2``."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(describe(policy))
    step, args = policy.step.eval(), example_inputs(policy)
    with _quiet():
        if format == "onnx":
            _export_onnx(policy, step, args, out, meta)
        elif format == "torchscript":
            traced = torch.jit.trace(step, args, check_trace=False)
            torch.jit.save(traced, str(out), _extra_files={META_FILE: meta})
        else:
            program = torch.export.export(step, args, dynamic_shapes=_dynamic(args))
            torch.export.save(program, str(out), extra_files={META_FILE: meta})
    return out


def _export_onnx(policy: Policy, step, args: tuple, out: Path, meta: str) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise ValueError(
            "ONNX export needs onnx and onnxscript: pip install -e '.[export]'"
        ) from None
    program = torch.onnx.export(
        step,
        args,
        dynamo=True,
        input_names=input_names(policy),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=_dynamic(args),
        verbose=False,
    )
    program.model.metadata_props[META_KEY] = meta
    program.save(str(out))


def _dynamic(args: tuple) -> tuple:
    """A dynamic batch dim on every input but ``deterministic``; ActingStep takes *inputs."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return (tuple({0: batch} if x.dim() else None for x in args),)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation chatter and torchvision notes say nothing about ours."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="# The axis name")
            yield
    finally:
        registration.setLevel(level)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The :func:`describe` JSON stored in an export."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return json.loads(props[META_KEY])
    if path.suffix == ".pt2":
        extra = {META_FILE: ""}
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra[META_FILE])
    extra = {META_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[META_FILE])


# --------------------------------------------------------------------------- MLflow model


def log_policy_model(
    policy: Policy,
    run_id: str,
    tracking_uri: str,
    register: str | None = None,
) -> Any:
    """Log ``policy`` into MLflow run ``run_id`` as the pyfunc model ``policy``: the ONNX
    export run by ``dreamer_trl/onnx_policy.py`` (numpy + onnxruntime), a policy file for
    :func:`~dreamer_trl.inference.load_policy`, a signature and an input example (the
    first step of one env). ``register`` also registers it under that name. Returns
    MLflow's ``ModelInfo``.

    The run is made MLflow's active run for the call (MLflow files a logged model under
    the active run's experiment) and is left FINISHED by it: call this on a finished run.
    """
    import mlflow
    from mlflow.models import Model

    from . import onnx_policy

    with tempfile.TemporaryDirectory(prefix="dreamer_model_") as tmp:
        onnx_path = export_policy(policy, Path(tmp) / ONNX_FILE, "onnx")
        # A directory artefact keeps its name inside the model: artifacts/checkpoint/.
        ckpt = Path(tmp) / MLFLOW_CHECKPOINT
        shutil.move(save_checkpoint(Path(tmp) / "save", policy_state(policy), keep=1), ckpt)
        runner = onnx_policy.OnnxPolicy(onnx_path)
        example = runner.serving_example()
        output = runner.predict(example, deterministic=True, seed=0)
        signature = mlflow.models.infer_signature(
            example, output, params={"deterministic": False, "seed": -1}
        )
        with _active_run(tracking_uri, run_id):
            return Model.log(
                artifact_path=None,
                name=MLFLOW_MODEL,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=onnx_policy.__file__,
                artifacts={"policy": str(onnx_path), MLFLOW_CHECKPOINT: str(ckpt)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=register,
                metadata={"dreamer_trl": describe(policy)},
            )


def _requirements() -> list[str]:
    """What serving the model needs: numpy, onnxruntime and MLflow (pinned to these)."""
    import mlflow
    import onnxruntime

    return [
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
        f"onnxruntime=={onnxruntime.__version__}",
    ]


@contextlib.contextmanager
def _active_run(tracking_uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``tracking_uri`` with ``run_id`` active; the global
    tracking URI and ``$MLFLOW_TRACKING_URI`` (which MLflow's setter rewrites) put back.
    No download progress bars (MLflow checks the input example through a download)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    uri_before = utils._tracking_uri
    env = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}
    with temporary_env(**env, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        mlflow.set_tracking_uri(tracking_uri)
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            utils._tracking_uri = uri_before
