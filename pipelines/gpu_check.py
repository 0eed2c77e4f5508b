"""The first-GPU check's steps (issue 20), one JSON each: run by pipelines/gpu_bench.sh.

    python pipelines/gpu_check.py STEP --device cuda --out results/gpu_check/STEP.json

Steps:
  preflight  versions (python, torch, CUDA, the kit's packages), the device, nvidia-smi;
  parity     one update on the CPU and on the device from the same weights, batch and noise
             (every random draw of the update made by one seeded CPU generator): losses
             within rtol 1e-4 in float32 imagination, 2e-2 in bfloat16, gradients likewise;
  sync       host-device syncs (torch.cuda.set_sync_debug_mode) in an update and in
             sample → update → write_back, per replay layout; skipped on a CPU;
  trainer    pipelines/train.py on Pendulum, tiny: a run with a checkpoint, its resume, and
             the all-on-device variant (replay.storage=tensor replay.device=D
             collector.device=D).
Exit status: 0 when the step's checks pass (or it was skipped), 1 when one failed.
``--quick`` shrinks the model and the runs (the CPU dry run, tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative, per loss and for the gradients
KIT = ("torchrl", "tensordict", "numpy", "hydra-core", "omegaconf", "gymnasium", "tqdm",
       "cloudpickle", "packaging", "pyyaml", "orjson")


# ---- preflight ---------------------------------------------------------------------------
def preflight(device: str, quick: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "packages": {name: ver(name) for name in KIT},
        "extensions": _extensions(),
        "nvidia_smi": _nvidia_smi(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    import dreamer_trl  # noqa: F401  the package imports with only the kit installed

    ok = torch.device(device).type != "cuda" or torch.cuda.is_available()
    info["checks"] = {"device_usable": ok}
    return info


def _extensions() -> dict:
    """Whether the compiled parts of torchrl and tensordict load against this torch."""
    found = {}
    for module in ("torchrl._torchrl", "tensordict._C"):
        try:
            __import__(module)
            found[module] = "loaded"
        except Exception as exc:  # a wheel built against another torch: record, go on
            found[module] = f"{type(exc).__name__}: {exc}"[:300]
    return found


def _nvidia_smi() -> str | None:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip() or None


# ---- parity ------------------------------------------------------------------------------
@contextmanager
def fixed_noise(seed: int):
    """Every torch.rand/randn(_like) inside draws from one CPU generator and is moved to
    the asked device: the CPU and the device update see the same noise, draw for draw."""
    gen = torch.Generator().manual_seed(seed)
    rand, randn = torch.rand, torch.randn

    def draw(base):
        def fn(*size, device=None, dtype=None, **_):
            shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
            return base(shape, generator=gen, dtype=dtype or torch.float32).to(device or "cpu")

        return fn

    def like(base):
        def fn(t, dtype=None, device=None, **_):
            return base(t.shape, generator=gen, dtype=dtype or t.dtype).to(device or t.device)

        return fn

    saved = {n: getattr(torch, n) for n in ("rand", "randn", "rand_like", "randn_like")}
    torch.rand, torch.randn = draw(rand), draw(randn)
    torch.rand_like, torch.randn_like = like(rand), like(randn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def parity(device: str, quick: bool) -> dict:
    from pipelines.bench import SIZE1M, TINY

    model = TINY if quick else SIZE1M
    b, t = (2, 8) if quick else (16, 64)
    result, ok = {"model": model["name"], "batch": [b, t]}, True
    for dtype, rtol in TOLERANCE.items():
        cpu, dev = _update_pair(model, b, t, device, dtype)
        row = _compare(cpu, dev, rtol)
        result[dtype] = row
        ok = ok and row["pass"]
    result["checks"] = {"within_tolerance": ok}
    return result


def _update_pair(model: dict, b: int, t: int, device: str, dtype: str):
    """(losses, grads, stoch) of one update on the CPU and on ``device``, same start."""
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.world_model import ObsSpace
    from pipelines.bench import synthetic_batch

    space = ObsSpace({"observation": 24}, {})
    algo = {"imag_dtype": dtype}
    torch.manual_seed(0)
    agents = [DreamerV3Agent(space, 6, False, model, algo) for _ in range(2)]
    agents[1].load_state_dict(agents[0].state_dict())
    agents[1].to(device)
    obs = {"observation": (24,)}
    batch = synthetic_batch(b, t, obs, 6, model["deter"], model["classes"], "cpu")
    runs = []
    for agent, where in zip(agents, ("cpu", device)):
        with fixed_noise(1):
            out = agent.update(batch.to(where))
        grads = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
            for p in agent.parameters()
        ])
        runs.append((out.cpu(), grads))
    return runs


def _compare(cpu, dev, rtol: float) -> dict:
    (out_c, g_c), (out_d, g_d) = cpu, dev
    losses = {}
    for key in sorted(k for k in out_c.keys() if k.startswith("loss_")):
        a, b = float(out_c[key]), float(out_d[key])
        losses[key] = {"cpu": a, "device": b, "rel": abs(a - b) / max(abs(a), 1e-6)}
    grad_rel = float((g_d - g_c).norm() / g_c.norm().clamp_min(1e-12))
    flips = float((out_c["stoch"] != out_d["stoch"]).float().mean())
    worst = max(v["rel"] for v in losses.values())
    return {
        "rtol": rtol,
        "losses": losses,
        "worst_loss_rel": worst,
        "grad_rel": grad_rel,
        "stoch_mismatch_fraction": flips,  # a category flipped by rounding at a boundary
        "pass": worst <= rtol and grad_rel <= rtol * 10,
    }


# ---- sync audit --------------------------------------------------------------------------
def sync_audit(device: str, quick: bool) -> dict:
    if torch.device(device).type != "cuda":
        return {
            "status": "skipped",
            "note": "torch.cuda.set_sync_debug_mode needs a CUDA device; a CPU has no "
            "host-device syncs to count",
        }
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.world_model import ObsSpace
    from pipelines.bench import SIZE1M, TINY, synthetic_batch

    model = TINY if quick else SIZE1M
    torch.manual_seed(0)
    agent = DreamerV3Agent(ObsSpace({"observation": 24}, {}), 6, False, model, {}).to(device)
    batch = synthetic_batch(16, 64, {"observation": (24,)}, 6, model["deter"],
                            model["classes"], device)
    for _ in range(2):
        agent.update(batch)  # warm: lazy inits and first-call allocations are not per update
    result = {"update": count_syncs(lambda: agent.update(batch))}
    for name, kw, to_device in (
        ("memmap_replay_trainer_path", {}, False),  # the trainer: sample().to(device)
        ("memmap_replay_pinned_path", {}, True),  # sample(device): pinned, non-blocking
        ("replay_on_device", {"storage": "tensor", "device": device}, False),
    ):
        replay = _filled_replay(model, **kw)
        result[name] = count_syncs(_train_step(agent, replay, device, to_device))
    result["status"] = "measured"
    return result


def _filled_replay(model: dict, **kw):
    import tempfile

    from dreamer_trl.replay import StepReplay
    from pipelines.bench import SIZE1M, replay_transitions

    replay = StepReplay(5000, 16, 65, ["observation"], scratch_dir=tempfile.mkdtemp(),
                        online=False, **kw)
    data = replay_transitions("proprio", 0, 4000)
    if model["deter"] != SIZE1M["deter"]:  # the tiny model's latents
        data["next", "deter"] = torch.zeros(4000, model["deter"])
    replay.extend(data)
    return replay


def _train_step(agent, replay, device: str, pinned: bool):
    def step() -> None:
        batch = replay.sample(device) if pinned else replay.sample().to(device)
        out = agent.update(batch)
        replay.write_back(batch, out.get("deter"), out.get("stoch"))

    step()  # warm (the sampler builds its index)
    return step


def count_syncs(fn, n: int = 3) -> dict:
    """Host-device syncs per call of ``fn`` and where they happen (file:line, top 12)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"per_call": len(syncs) / n, "sites": sites.most_common(12)}


# ---- trainer smoke -----------------------------------------------------------------------
SMOKE = [
    "env=pendulum", "env.max_episode_steps=100", "model.deter=64", "model.hidden=16",
    "model.units=16", "model.depth=2", "train.total_steps=64", "train.train_start=32",
    "train.random_steps=32", "train.batch_size=2", "train.seq_len=8", "train.train_ratio=1",
    "train.log_every=16", "train.eval_every=0", "train.eval_episodes=1",
    "train.checkpoint_every=32", "train.progress=false", "replay.capacity=1000",
    "tracking.enabled=false", "eval.video=false", "compile.policy=false", "compile.steps=false",
]


def trainer_smoke(device: str, quick: bool, out_dir: Path, limit: float = 240) -> dict:
    """Three train.py runs, each under ``limit`` seconds: a run (with a checkpoint at
    step 32 of 64), its resume to 96, and the all-on-device variant."""
    from dreamer_trl.checkpoint import find_checkpoint, load_checkpoint

    base = [*SMOKE, f"device={device}"]
    on_device = ["replay.storage=tensor", f"replay.device={device}", f"collector.device={device}"]
    runs = {
        "run": [*base, f"run_dir={out_dir / 'run'}"],
        "resume": [f"resume={out_dir / 'run'}", "train.total_steps=96"],
        "all_on_device": [*base, *on_device, f"run_dir={out_dir / 'on_device'}"],
    }
    result, ok = {}, True
    for name, overrides in runs.items():
        row = _train(overrides, limit)
        run_dir = out_dir / ("on_device" if name == "all_on_device" else "run")
        try:
            state = load_checkpoint(find_checkpoint(run_dir), verify=False)
            row["checkpoint_env_steps"] = state["counters"]["env_steps"]
        except Exception as exc:  # none written: the row says why
            row["checkpoint_env_steps"] = None
            row["checkpoint_error"] = f"{type(exc).__name__}: {exc}"[:300]
        expected = 96 if name == "resume" else 64
        row["pass"] = row["rc"] == 0 and row["checkpoint_env_steps"] == expected
        ok = ok and row["pass"]
        result[name] = row
    result["checks"] = {"all_runs_pass": ok}
    return result


def _train(overrides: list[str], limit: float) -> dict:
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), *overrides]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = "timeout", (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "overrides": overrides, "output_tail": text[-2500:]}


# ---- CLI ---------------------------------------------------------------------------------
def switches(device: str, quick: bool) -> dict:
    """The measured switches (issue 20 item 3), ms per size1m update, median: the pipeline
    default (compiled RSSM steps), fp32 matmuls on TF32 (``matmul_precision=high``), the
    replay step (sample → update → write_back from a memmap replay) without and with the
    next batch drawn ahead (``replay.prefetch``), and CUDA graphs for the compiled steps
    (``compile.mode=reduce-overhead``; CUDA only, compiles for a minute or two)."""
    import statistics

    from dreamer_trl.learner import Prefetch, update_step
    from pipelines.bench import SIZE1M, TINY, make_ours, timed

    model = TINY if quick else SIZE1M
    reps, warm = (1, 1) if quick else (7, 2)
    obs = {"observation": (24,)}

    def ms(fn) -> float:
        for _ in range(warm):
            fn()
        return round(1e3 * statistics.median(timed(fn, device) for _ in range(reps)), 2)

    # The dry run (quick) stays eager: compiling on a busy CPU takes minutes, and the
    # plumbing is what it checks.
    compiled = None if quick else "steps"
    update, _, agent, _ = make_ours(model, obs, device, compiled=compiled, observe_chunk=4)
    rows = {"default": ms(update)}
    torch.set_float32_matmul_precision("high")
    try:
        rows["matmul_high"] = ms(update)
    finally:
        torch.set_float32_matmul_precision("highest")
    replay = _filled_replay(model)
    for name, ahead in (("replay_step", None), ("replay_step_prefetch", Prefetch(replay, device))):
        rows[name] = ms(lambda a=ahead: update_step(agent, replay, device, prefetch=a, ahead=True))
    if torch.device(device).type == "cuda" and not quick:
        graphs, _, agent2, _ = make_ours(model, obs, device)
        agent2.compile_steps(observe_chunk=4, mode="reduce-overhead")
        rows["cuda_graphs"] = ms(graphs)
    return {"status": "measured", "ms_per_update": rows}


STEPS = {"preflight": preflight, "parity": parity, "sync": sync_audit, "switches": switches}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=[*STEPS, "trainer"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, help="the step's JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run)")
    parser.add_argument("--limit", type=float, default=240, help="trainer: s per run")
    parser.add_argument("--runs", help="trainer: where the run dirs go (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.step == "trainer":
        import tempfile

        runs = Path(args.runs or tempfile.mkdtemp(prefix="gpu_check_runs_"))
        result = trainer_smoke(args.device, args.quick, runs, args.limit)
    else:
        result = STEPS[args.step](args.device, args.quick)
    checks = result.get("checks", {})
    result.update(step=args.step, device=args.device, quick=args.quick,
                  seconds=round(time.perf_counter() - start, 1), ok=all(checks.values()))
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("step", "ok", "seconds")} | {"checks": checks}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
