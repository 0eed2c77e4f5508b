"""Speed benchmark: `make bench [ARGS="k=v …"]`.

In one process, after warm-up, times the full DreamerV3 update (world model + actor +
critic + replay value + optimiser) at B16×T64, H15 for
  * ours at size1m on walker-shaped vectors (24-dim obs, 6-dim action): eager, with the
    RSSM observe/imagination steps compiled (the pipeline default), all-float32, and
    (compile=true) the whole update compiled; size12m on 64×64 pixels on a GPU;
  * TorchRL 0.14's own DreamerV3 update at the same shapes (pipelines/torchrl_baseline.py);
  * the update's FLOPs (torch.utils.flop_counter) over its time, beside a plain fp32 matmul's
    GFLOP/s measured in the same process;
  * acting: collector env steps/s on DMC walker with our size1m policy vs a random policy.
Rounds alternate between the contenders so a noisy machine hurts both alike; the median
round is reported, timed warm (a contender's second update in a row, as training runs them)
and cold (its first, right after the others ran). Peak memory of each is measured in a
child process (it is a per-process figure). Prints a table and writes results/bench.json.

Options (key=value): rounds=7, warmup=2, compile=false (true adds the whole-update
torch.compile: 10+ minutes of compilation on a 2-core CPU), acting_steps=2000, threads=0 (0: torch
default), out=results/bench.json, memory=true, keep_memory=true (glibc keeps freed memory
mapped, as training does; it applies to every contender in the process, TorchRL included),
observe_chunk=4 (filtering steps per compiled graph, as ``compile.observe_chunk``),
devices=auto (cpu, gpu or cpu,gpu; auto: the CPU, and the GPU when one is visible — a GPU
lease can skip the CPU's minutes with devices=gpu), acting=true (the CPU acting figures),
rewarm=true (each round also times every contender a second time straight after its
first, cold call: the headline is that warm figure, the steady state of training's back to
back updates; the cold one, just after the other contenders ran, is reported beside it).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.common import ConfigError, run_cli  # noqa: E402

OPTIONS = {
    "rounds": 7,
    "warmup": 2,
    "compile": False,
    "acting_steps": 2000,
    "threads": 0,
    "out": "results/bench.json",
    "memory": True,
    "keep_memory": True,
    "observe_chunk": 4,
    "devices": "auto",
    "acting": True,
    "rewarm": True,
}
DEVICES = ("cpu", "gpu")
SIZE1M = dict(name="size1m", deter=512, hidden=64, classes=4, units=64, depth=4)
SIZE12M = dict(name="size12m", deter=2048, hidden=256, classes=16, units=256, depth=16)


def parse_options(argv: list[str]) -> dict:
    opts = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(f"unknown option {arg!r}; valid: {', '.join(OPTIONS)}")
        default = OPTIONS[key]
        if isinstance(default, bool):
            opts[key] = value.lower() in ("1", "true", "yes")
        else:
            opts[key] = type(default)(value)
    opts["devices"] = parse_devices(opts["devices"])
    return opts


def parse_devices(value: str) -> list[str]:
    """``devices=`` → the devices to benchmark, in order; a GPU asked for must exist."""
    if value == "auto":
        return ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in DEVICES]
    if bad or not names:
        raise ConfigError(f"devices={value!r}: valid are auto or a list of {', '.join(DEVICES)}")
    if "gpu" in names and not torch.cuda.is_available():
        raise ConfigError(f"devices={value!r} asks for the GPU, but torch sees no CUDA device")
    return [d for d in DEVICES if d in names]


def synthetic_batch(
    b: int, t: int, obs: dict, act_dim: int, deter: int, classes: int, device
) -> TensorDict:  # noqa: F821
    """A replay batch of steps [B, T+1] with a few episode boundaries."""
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(0)
    data = {}
    for key, shape in obs.items():
        if len(shape) == 3:
            data[key] = torch.randint(0, 256, (b, t + 1, *shape), generator=g, dtype=torch.uint8)
        else:
            data[key] = torch.randn(b, t + 1, *shape, generator=g)
    flags = torch.zeros(b, t + 1, dtype=torch.bool)
    first = flags.clone()
    first[:, (5 * t) // 8] = True  # an episode boundary inside every sequence
    last = flags.clone()
    last[:, (5 * t) // 8 - 1] = True
    stoch = torch.randint(0, classes, (b, t + 1, 32), generator=g)
    data.update(
        action=torch.rand(b, t + 1, act_dim, generator=g) * 2 - 1,
        reward=torch.randn(b, t + 1, generator=g),
        is_first=first,
        is_last=last,
        is_terminal=flags,
        deter=torch.randn(b, t + 1, deter, generator=g),
        stoch=torch.nn.functional.one_hot(stoch, classes).float(),
    )
    return TensorDict(data, [b, t + 1]).to(device)


def make_ours(
    model: dict,
    obs: dict,
    device,
    compiled: str | None = None,
    algo: dict | None = None,
    observe_chunk: int = 1,
):
    """(update fn, param count, agent, batch) for our agent on synthetic data."""
    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.world_model import ObsSpace

    torch.manual_seed(0)
    space = ObsSpace(
        {k: v[0] for k, v in obs.items() if len(v) == 1},
        {k: v for k, v in obs.items() if len(v) == 3},
    )
    agent = DreamerV3Agent(space, 6, False, model, algo or {}).to(device)
    if compiled == "update":
        agent.compile()
    elif compiled == "steps":
        agent.compile_steps(observe_chunk=observe_chunk)
    batch = synthetic_batch(16, 64, obs, 6, model["deter"], model["classes"], device)
    return (lambda: agent.update(batch)), agent.num_params(), agent, batch


def count_flops(agent, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        agent.update(batch)
    return float(counter.get_total_flops())


def matmul_gflops(device, n: int | None = None, reps: int = 20, dtype=torch.float32) -> float:
    """Best-of-3 GFLOP/s of an n×n×n matmul: n 1024 on the CPU, 8192 on a GPU (a
    1024 product would measure an H200's launch latency, not its arithmetic)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e9


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def race(
    contenders: dict, rounds: int, warmup: int, device, rewarm: bool = True
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternate the contenders round by round; returns (warm, cold) times per contender.

    Each round times a contender's update right after the other contenders ran (cold:
    they have evicted its caches and reshaped the heap) and, with ``rewarm``, once more
    straight after that (warm: the steady state of training, where updates run back to
    back with only a few acting steps between). Without ``rewarm`` the two are the same.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    warm = {name: [] for name in contenders}
    cold = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            cold[name].append(timed(fn, device))
            warm[name].append(timed(fn, device) if rewarm else cold[name][-1])
        print(
            f"  round {r + 1}/{rounds} (warm / cold): "
            + ", ".join(f"{n} {warm[n][-1]:.3f}/{cold[n][-1]:.3f}s" for n in contenders),
            flush=True,
        )
    return warm, cold


def acting_rate(steps: int, random: bool, compiled: bool = True) -> float:
    """Collector env steps/s on DMC walker-walk with our size1m policy (compiled acting
    step, the pipeline default; its compile happens in the warm-up batches) or a random one."""
    from torchrl.collectors import Collector
    from torchrl.envs.utils import RandomPolicy

    from dreamer_trl.agent import DreamerV3Agent
    from dreamer_trl.envs import make_env
    from dreamer_trl.trainer import acting_env, make_policy

    cfg = {"name": "dmc_walker", "suite": "dmc", "task": "walker-walk"}
    probe = make_env(cfg, 0)
    if random:
        policy = RandomPolicy(probe.action_spec)
        env_fn = lambda: make_env(cfg, 0)  # noqa: E731
    else:
        agent = DreamerV3Agent.from_specs(probe.observation_spec, probe.action_spec, SIZE1M, {})
        policy = make_policy(agent, probe.action_spec, compile=compiled)
        env_fn = lambda: acting_env(cfg, 0, policy)  # noqa: E731
    collector = Collector(env_fn, policy, frames_per_batch=100, total_frames=steps + 200)
    it = iter(collector)
    next(it), next(it)  # warm-up (and the acting step's compilation)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch.numel()
    rate = n / (time.perf_counter() - start)
    collector.shutdown()
    return rate


def child_peak_mb(kind: str) -> float | None:
    """Peak RSS (MB) of a child process that runs two updates of ``kind``."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipelines.bench import _mem_child;"
        f" _mem_child({kind!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  memory child {kind} failed: {out.stderr.strip()[-300:]}")
        return None


def _mem_child(kind: str) -> None:
    obs = {"observation": (24,)}
    if kind == "ours":
        fn = make_ours(SIZE1M, obs, "cpu")[0]
    else:
        from pipelines.torchrl_baseline import make_torchrl_update

        fn = make_torchrl_update()[0]
    fn()
    fn()
    print(_peak_rss_mb())


def _peak_rss_mb() -> float:
    """This address space's high-water mark. (ru_maxrss would not do: Linux carries it
    over from the parent across fork+exec, so every child reported the bench's own peak.)"""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def bench_device(device: str, opts: dict) -> dict:
    from pipelines.torchrl_baseline import make_torchrl_update

    obs = {"observation": (24,)}
    eager, params, agent, batch = make_ours(SIZE1M, obs, device)
    theirs, their_params = make_torchrl_update(device=device)
    # The default computes imagination in bf16 (algo.imag_dtype); the all-float32 agent
    # races too, reported apart (the headline ratio is the default configuration's).
    fp32 = make_ours(SIZE1M, obs, device, algo={"imag_dtype": "float32"})[0]
    # ours_compiled is the pipeline default (compile.steps): the RSSM observe and
    # imagination steps compiled; compile=true adds the whole update as ours_compiled_update.
    chunk = opts["observe_chunk"]
    compiled = make_ours(SIZE1M, obs, device, compiled="steps", observe_chunk=chunk)[0]
    compile_s = timed(compiled, device)
    print(f"  compiled RSSM steps: first call (compile) {compile_s:.1f}s", flush=True)
    contenders = {
        "ours_eager": eager,
        "ours_compiled": compiled,
        "ours_fp32": fp32,
        "torchrl": theirs,
    }
    if opts["compile"]:
        whole = make_ours(SIZE1M, obs, device, compiled="update")[0]
        print(f"  compiled update: first call {timed(whole, device):.1f}s", flush=True)
        contenders["ours_compiled_update"] = whole
    times, cold = race(contenders, opts["rounds"], opts["warmup"], device, opts["rewarm"])
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cold = {k: statistics.median(v) for k, v in cold.items()}
    flops = count_flops(agent, batch)
    mm = matmul_gflops(device)
    ours = ("ours_eager", "ours_compiled", "ours_compiled_update")
    best = min(v for k, v in med.items() if k in ours)
    best_cold = min(v for k, v in med_cold.items() if k in ours)
    result = {
        "update_seconds": {
            "ours_eager": med["ours_eager"],
            "ours_compiled": med.get("ours_compiled"),
            "ours_compiled_update": med.get("ours_compiled_update"),
            "ours_fp32": med["ours_fp32"],
            "torchrl": med["torchrl"],
        },
        "update_seconds_all": times,
        "update_seconds_cold": med_cold,
        "update_seconds_cold_all": cold,
        "compile_seconds": compile_s,
        "ratio_vs_torchrl": med["torchrl"] / best,
        "ratio_vs_torchrl_cold": med_cold["torchrl"] / best_cold,
        "ratio_vs_torchrl_fp32": med["torchrl"] / med["ours_fp32"],
        "update_gflop": flops / 1e9,
        "update_gflops": flops / best / 1e9,
        "matmul_gflops": mm,
        "matmul_gflops_bf16": matmul_gflops(device, dtype=torch.bfloat16),
        "fraction_of_matmul": flops / best / 1e9 / mm,
        "params": {"ours": params, "torchrl": their_params},
    }
    if torch.device(device).type == "cuda":
        pix = {"pixels": (3, 64, 64)}
        big, _, _, _ = make_ours(SIZE12M, pix, device)
        big_times = race({"size12m_pixels": big}, opts["rounds"], opts["warmup"], device)[0]
        result["update_seconds"]["ours_size12m_pixels"] = statistics.median(
            big_times["size12m_pixels"]
        )
        contenders["size12m_pixels"] = big
        result["peak_memory_mb"] = {k: cuda_peak_mb(fn) for k, fn in contenders.items()}
    return result


def cuda_peak_mb(fn) -> float:
    """Peak CUDA memory (MB) allocated during one call of ``fn``, above what was held
    before it (the process holds every contender's model and batch at once)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    from dreamer_trl.runtime import keep_freed_memory

    # Process-wide, so it applies to both contenders alike.
    kept = opts["keep_memory"] and keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {_cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "keep_freed_memory": kept,
        "cpu": None,
        "gpu": None,
    }
    for dev in opts["devices"]:
        print(f"update step, {dev.upper()}:", flush=True)
        report[dev] = bench_device("cuda" if dev == "gpu" else "cpu", opts)
    if report["cpu"] and opts["acting"]:
        print("acting (collector steps/s, DMC walker):", flush=True)
        report["cpu"]["acting_steps_per_second"] = {
            "policy": acting_rate(opts["acting_steps"], random=False),
            "policy_eager": acting_rate(opts["acting_steps"], random=False, compiled=False),
            "random": acting_rate(opts["acting_steps"], random=True),
        }
    if report["cpu"] and opts["memory"]:
        report["cpu"]["peak_memory_mb"] = {k: child_peak_mb(k) for k in ("ours", "torchrl")}
    print_table(report)
    out = ROOT / opts["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_table(report: dict) -> None:
    for dev in ("cpu", "gpu"):
        r = report[dev]
        if not r:
            continue
        u = r["update_seconds"]
        print(f"\n== {dev} ({report['machine']}, commit {report['commit']}) ==")
        print(f"  glibc keeps freed memory: {report.get('keep_freed_memory')}")
        c = r.get("update_seconds_cold") or {}
        rows = [
            (k, f"{v * 1000:.0f} ms" + (f" (cold {c[k] * 1000:.0f} ms)" if k in c else ""))
            for k, v in u.items()
            if v is not None
        ]
        rows += [
            ("ratio torchrl / ours (best default)", f"{r['ratio_vs_torchrl']:.2f}x"),
            ("ratio, cold updates", f"{r['ratio_vs_torchrl_cold']:.2f}x"),
            ("ratio torchrl / ours (all float32)", f"{r['ratio_vs_torchrl_fp32']:.2f}x"),
            ("update GFLOP", f"{r['update_gflop']:.1f}"),
            ("update GFLOP/s (best)", f"{r['update_gflops']:.1f}"),
            (
                "matmul GFLOP/s fp32 (bf16)",
                f"{r['matmul_gflops']:.1f} ({r['matmul_gflops_bf16']:.1f})",
            ),
            ("fraction of matmul", f"{100 * r['fraction_of_matmul']:.0f}%"),
        ]
        if r.get("compile_seconds") is not None:
            rows.append(("compile time (RSSM steps)", f"{r['compile_seconds']:.0f} s"))
        act = r.get("acting_steps_per_second")
        if act:
            rows += [
                ("acting steps/s policy", f"{act['policy']:.0f}"),
                ("acting steps/s policy (eager)", f"{act['policy_eager']:.0f}"),
                ("acting steps/s random", f"{act['random']:.0f}"),
                ("acting policy / random", f"{100 * act['policy'] / act['random']:.0f}%"),
            ]
        for k, v in (r.get("peak_memory_mb") or {}).items():
            rows.append((f"peak memory {k}", f"{v:.0f} MB" if v else "n/a"))
        for name, value in rows:
            print(f"  {name:32s} {value}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
