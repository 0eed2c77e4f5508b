"""Acting latency of a trained-agent policy, part of `make bench` (or alone:
`.venv/bin/python pipelines/bench_latency.py [k=v …]`).

Milliseconds per ``act`` step, batch 1 and 16, of the size1m policy on walker-shaped inputs
(24-dim observation, 6-dim action; untrained weights, which cost what trained ones do):
eager (``dreamer_trl.Policy.act``), compiled (the same with ``Policy.compile()``) and the
ONNX export in onnxruntime (``dreamer_trl.onnx_policy.OnnxPolicy.act``), each from numpy
observations to numpy actions with its own noise drawing, the state carried from step to
step. Rounds alternate between the contenders (a noisy machine hurts all alike); the median
round is reported. The GPU runs eager and compiled (onnxruntime here is a CPU build).

Options: batches=1,16, steps=100 (per round), rounds=5, compile=true, onnx=true,
devices=auto (cpu, gpu or cpu,gpu), threads=0 (torch and onnxruntime threads; 0: torch's
default), quick=false (a tiny model, 3 steps, eager only: the plumbing, not numbers).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

SIZE1M = dict(deter=512, hidden=64, classes=4, units=64, depth=4)
TINY = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
OBS_DIM, ACTION_DIM = 24, 6
OPTIONS = {
    "batches": "1,16",
    "steps": "100",
    "rounds": "5",
    "compile": "true",
    "onnx": "true",
    "devices": "auto",
    "threads": "0",
    "quick": "false",
}


def parse_options(argv: list[str]) -> dict:
    raw = key_values(argv, OPTIONS)
    try:
        opts = {
            "batches": [int(b) for b in raw["batches"].split(",") if b],
            "steps": int(raw["steps"]),
            "rounds": int(raw["rounds"]),
            "threads": int(raw["threads"]),
        }
    except ValueError as err:
        raise ConfigError(f"latency options must be integers: {err}") from None
    for key in ("compile", "onnx", "quick"):
        if raw[key].lower() not in ("true", "false"):
            raise ConfigError(f"{key} must be true or false, got {raw[key]!r}")
        opts[key] = raw[key].lower() == "true"
    names = [d for d in raw["devices"].split(",") if d]
    if raw["devices"] == "auto":
        names = ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
    elif not names or set(names) - {"cpu", "gpu"} or (
        "gpu" in names and not torch.cuda.is_available()
    ):
        raise ConfigError(
            f"devices={raw['devices']!r}: valid are auto, cpu, gpu or cpu,gpu (gpu: a visible "
            "CUDA device)"
        )
    return {**opts, "devices": names}


def defaults() -> dict:
    """The options with nothing given (what `make bench` runs)."""
    return parse_options([])


def walker_policy(device: str, model: dict):
    """An untrained Policy of the size the pipeline trains on walker."""
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.inference import ActionSpace, Policy
    from dreamer_trl.world_model import ObsSpace

    torch.manual_seed(0)
    space = ObsSpace(vectors={"observation": OBS_DIM}, images={})
    agent = DreamerV3Agent(space, ACTION_DIM, False, model, {"imag_dtype": "float32"})
    box = ActionSpace(False, ACTION_DIM, (-1.0,) * ACTION_DIM, (1.0,) * ACTION_DIM)
    agent.to(device)
    return lambda: Policy(agent.world_model, agent.actor, space, box, {"env": {}})


def stepper(act: Callable, state, batch: int) -> Callable[[int], float]:
    """``run(n)``: n consecutive steps from numpy observations, the state carried; returns
    seconds per step (synchronised with the device)."""
    obs = np.random.default_rng(0).normal(size=(batch, OBS_DIM)).astype(np.float32)
    carry = [state]

    def run(n: int) -> float:
        _sync()
        start = time.perf_counter()
        for _ in range(n):
            _, carry[0] = act(obs, carry[0])
        _sync()
        return (time.perf_counter() - start) / n

    return run


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def contenders(device: str, batch: int, opts: dict, onnx_path: Path | None) -> dict:
    """name → (step runner, seconds its first call took: the compile, for ``compiled``)."""
    make = walker_policy(device, TINY if opts["quick"] else SIZE1M)
    eager = make()
    runners = {"eager": stepper(eager.act, eager.initial_state(batch), batch)}
    first = {"eager": runners["eager"](1)}
    if opts["compile"]:
        compiled = make().compile()
        runners["compiled"] = stepper(compiled.act, compiled.initial_state(batch), batch)
        first["compiled"] = runners["compiled"](1)
    if onnx_path is not None:
        from dreamer_trl.onnx_policy import OnnxPolicy

        onnx = OnnxPolicy(onnx_path, threads=torch.get_num_threads())
        runners["onnx"] = stepper(onnx.act, onnx.initial_state(batch), batch)
        first["onnx"] = runners["onnx"](1)
    return {name: (run, first[name]) for name, run in runners.items()}


def acting_latency(device: str, opts: dict) -> dict:
    """{batch: {contender: median ms per step}} plus the compile seconds per batch."""
    onnx = opts["onnx"] and device == "cpu" and _can_export_onnx()
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        path = export_onnx(Path(tmp), opts) if onnx else None
        model = "tiny" if opts["quick"] else "size1m"
        result = {"model": model, "ms_per_step": {}, "first_call_seconds": {}}
        for batch in opts["batches"]:
            runs = contenders("cuda" if device == "gpu" else "cpu", batch, opts, path)
            for run, _ in runs.values():
                run(min(10, opts["steps"]))  # warm-up
            times = {name: [] for name in runs}
            for _ in range(opts["rounds"]):
                for name, (run, _) in runs.items():
                    times[name].append(run(opts["steps"]))
            result["ms_per_step"][str(batch)] = {
                n: 1e3 * statistics.median(t) for n, t in times.items()
            }
            result["first_call_seconds"][str(batch)] = {n: f for n, (_, f) in runs.items()}
            ms = result["ms_per_step"][str(batch)]
            print(f"  batch {batch}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in ms.items()))
    return result


def _can_export_onnx() -> bool:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(m)]
    if missing:
        print(f"  onnx: skipped ({', '.join(missing)} not installed: pip install -e '.[export]')")
    return not missing


def export_onnx(folder: Path, opts: dict) -> Path:
    from dreamer_trl.export import export_policy

    start = time.perf_counter()
    policy = walker_policy("cpu", TINY if opts["quick"] else SIZE1M)()
    path = export_policy(policy, folder / "p.onnx")
    print(f"  ONNX export: {time.perf_counter() - start:.1f} s", flush=True)
    return path


def run_all(opts: dict) -> dict:
    """``acting_latency`` on each of ``opts['devices']``: {device: result}."""
    if opts["quick"]:  # as bench.py's quick: no compile (nor an ONNX export)
        opts = {**opts, "steps": 3, "rounds": 1, "compile": False, "onnx": False}
    out = {}
    for device in opts["devices"]:
        print(f"acting latency, {device.upper()} (ms per step):", flush=True)
        out[device] = acting_latency(device, opts)
    return out


def print_latency_table(latency: dict) -> None:
    for device, result in latency.items():
        rows = result["ms_per_step"]
        names = list(next(iter(rows.values())))
        print(f"\n== acting latency, {device}: ms per step, {result['model']} walker policy ==")
        print("  " + f"{'batch':>6s}" + "".join(f"{n:>12s}" for n in names))
        for batch, ms in rows.items():
            print("  " + f"{batch:>6s}" + "".join(f"{ms[n]:12.3f}" for n in names))
        compiles = [f.get("compiled") for f in result["first_call_seconds"].values()]
        if all(c is not None for c in compiles):
            print("  compile (first call): " + ", ".join(f"{c:.0f} s" for c in compiles))


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    print_latency_table(run_all(opts))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
