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
lease can skip the CPU's minutes with devices=gpu; none: no update benchmark),
acting=true (the CPU acting figures),
latency=true (per-step acting latency of the trained-agent policy, batch 1 and 16: eager,
compiled and ONNX in onnxruntime, on the benchmarked devices; pipelines/bench_latency.py),
rewarm=true (each round also times every contender a second time straight after its
first, cold call: the headline is that warm figure, the steady state of training's back to
back updates; the cold one, just after the other contenders ran, is reported beside it),
torchrl=true (false: no TorchRL baseline, e.g. on a machine without its wheels' extras),
quick=false (true: ours eager only, no compile, small matmul: a dry run of the plumbing,
not numbers).

Replay (issue 20; CPU, the replay lives in host memory): ms per update of sample +
write-back (+ the extend of one collector batch per 16 updates, amortised) on memmap
replays holding replay_sizes=10000,100000,1000000 proprio steps and replay_pixels=100000
pixel steps (0: none), median of replay_rounds=5 collector batches, each timed cold (after
the other variants) and warm (straight after); replay=false skips it.
replay_before=true races the pre-issue-20 path beside it ("before": TorchRL's fragmented
SliceSampler with the write-back through storage.set; "slice_direct": that sampler with
latents written in place; "after": StreamSliceSampler, the pipeline's replay).
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
    "latency": True,
    "torchrl": True,
    "quick": False,
    "replay": True,
    "replay_sizes": "10000,100000,1000000",
    "replay_pixels": 100000,
    "replay_rounds": 5,
    "replay_before": True,
}
DEVICES = ("cpu", "gpu")
SIZE1M = dict(name="size1m", deter=512, hidden=64, classes=4, units=64, depth=4)
SIZE12M = dict(name="size12m", deter=2048, hidden=256, classes=16, units=256, depth=16)
TINY = dict(SIZE1M, name="tiny", deter=64, hidden=16, units=16, depth=2)  # quick=true


def parse_options(argv: list[str], options: dict | None = None) -> dict:
    """key=value arguments over ``options`` (default: this benchmark's), typed like them."""
    options = OPTIONS if options is None else options
    opts = dict(options)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ConfigError(f"unknown option {arg!r}; valid: {', '.join(options)}")
        default = options[key]
        if isinstance(default, bool):
            opts[key] = value.lower() in ("1", "true", "yes")
        else:
            opts[key] = type(default)(value)
    if "devices" in opts:
        opts["devices"] = parse_devices(opts["devices"])
    return opts


def parse_devices(value: str) -> list[str]:
    """``devices=`` → the devices to benchmark, in order; a GPU asked for must exist."""
    if value == "auto":
        return ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
    if value == "none":  # no update benchmark: e.g. the replay section alone
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in DEVICES]
    if bad or not names:
        raise ConfigError(
            f"devices={value!r}: valid are auto, none or a list of {', '.join(DEVICES)}"
        )
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
    batch_shape: tuple[int, int] = (16, 64),
):
    """(update fn, param count, agent, batch) for our agent on synthetic data [B, T+1]."""
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
    batch = synthetic_batch(*batch_shape, obs, 6, model["deter"], model["classes"], device)
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
    from dreamer_trl.collection import acting_env, make_policy
    from dreamer_trl.envs import make_env

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
    try:  # a lent GPU machine may have no git, and its copy of the tree no .git
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def bench_device(device: str, opts: dict) -> dict:
    obs = {"observation": (24,)}
    if opts["quick"]:  # the plumbing only: a tiny model on a short batch
        eager, params, agent, batch = make_ours(TINY, obs, device, batch_shape=(2, 8))
    else:
        eager, params, agent, batch = make_ours(SIZE1M, obs, device)
    contenders, compile_s, their_params = {"ours_eager": eager}, None, None
    if not opts["quick"]:
        # ours_compiled is the pipeline default (compile.steps): the RSSM observe and
        # imagination steps compiled; compile=true adds the whole update (below).
        chunk = opts["observe_chunk"]
        compiled = make_ours(SIZE1M, obs, device, compiled="steps", observe_chunk=chunk)[0]
        compile_s = timed(compiled, device)
        print(f"  compiled RSSM steps: first call (compile) {compile_s:.1f}s", flush=True)
        contenders["ours_compiled"] = compiled
        # The default computes imagination in bf16 (algo.imag_dtype); the all-float32
        # agent races too, reported apart (the headline ratio is the default's).
        contenders["ours_fp32"] = make_ours(SIZE1M, obs, device, algo={"imag_dtype": "float32"})[0]
    if opts["torchrl"] and not opts["quick"]:
        from pipelines.torchrl_baseline import make_torchrl_update

        contenders["torchrl"], their_params = make_torchrl_update(device=device)
    if opts["compile"]:
        whole = make_ours(SIZE1M, obs, device, compiled="update")[0]
        print(f"  compiled update: first call {timed(whole, device):.1f}s", flush=True)
        contenders["ours_compiled_update"] = whole
    times, cold = race(contenders, opts["rounds"], opts["warmup"], device, opts["rewarm"])
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cold = {k: statistics.median(v) for k, v in cold.items()}
    flops = count_flops(agent, batch)
    mm_n = 256 if opts["quick"] else None
    mm = matmul_gflops(device, n=mm_n)
    ours = ("ours_eager", "ours_compiled", "ours_compiled_update")
    best = min(v for k, v in med.items() if k in ours)
    best_cold = min(v for k, v in med_cold.items() if k in ours)
    result = {
        "update_seconds": {k: med.get(k) for k in UPDATE_CONTENDERS},
        "update_seconds_all": times,
        "update_seconds_cold": med_cold,
        "update_seconds_cold_all": cold,
        "compile_seconds": compile_s,
        "ratio_vs_torchrl": _ratio(med.get("torchrl"), best),
        "ratio_vs_torchrl_cold": _ratio(med_cold.get("torchrl"), best_cold),
        "ratio_vs_torchrl_fp32": _ratio(med.get("torchrl"), med.get("ours_fp32")),
        "update_gflop": flops / 1e9,
        "update_gflops": flops / best / 1e9,
        "matmul_gflops": mm,
        "matmul_gflops_bf16": matmul_gflops(device, n=mm_n, dtype=torch.bfloat16),
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


UPDATE_CONTENDERS = (
    "ours_eager", "ours_compiled", "ours_compiled_update", "ours_fp32", "torchrl"
)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


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
        "quick": opts["quick"],
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
    if opts["latency"]:
        from pipelines.bench_latency import defaults, run_all

        latency = {**defaults(), "devices": opts["devices"] or ["cpu"], "quick": opts["quick"]}
        report["acting_latency"] = run_all(latency)
    if report["cpu"] and opts["memory"]:
        kinds = ("ours", "torchrl") if opts["torchrl"] else ("ours",)
        report["cpu"]["peak_memory_mb"] = {k: child_peak_mb(k) for k in kinds}
    if opts["replay"]:
        report["replay"] = bench_replay(opts)
    print_table(report)
    if report.get("acting_latency"):
        from pipelines.bench_latency import print_latency_table

        print_latency_table(report["acting_latency"])
    if report.get("replay"):
        print_replay_table(report["replay"])
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
            ("ratio torchrl / ours (best default)", _times(r["ratio_vs_torchrl"])),
            ("ratio, cold updates", _times(r["ratio_vs_torchrl_cold"])),
            ("ratio torchrl / ours (all float32)", _times(r["ratio_vs_torchrl_fp32"])),
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


def _times(ratio: float | None) -> str:
    return "n/a (torchrl=false)" if ratio is None else f"{ratio:.2f}x"


# ---- replay: sample + write-back cost vs stored steps (issue 20) ---------------------
# Each variant replays the same work on its own filled buffer, rounds alternating between
# them: per collector batch (16 env steps at the default frames_per_batch) one extend,
# then 16 updates' sample + write-back (train ratio 1024 at B16×T64: one update per step).
# Each round times a variant's batch twice: cold, right after the other variants ran
# (their passes over a million rows evict its caches), and warm, straight after that.
REPLAY_VARIANTS = {
    # name: (StepReplay sampler, write-back path, batch gather)
    # before issue 20: TorchRL's fragmented SliceSampler through buffer.sample (which
    # gathers the rows twice, by advanced indexing), the write-back through storage.set
    "before": ("slice", "storage_set", "buffer"),
    "slice_direct": ("slice", "direct", "buffer"),  # the same, latents written in place
    "after": ("stream", "direct", "replay"),  # the pipeline's replay: StepReplay.sample
}
REPLAY_SHAPES = {  # obs key → shape, action dims, deter, classes
    "proprio": ({"observation": (24,)}, 6, SIZE1M["deter"], SIZE1M["classes"]),
    "pixels": ({"pixels": (3, 64, 64)}, 6, SIZE12M["deter"], SIZE12M["classes"]),
}
UPDATES_PER_EXTEND = 16


def bench_replay(opts: dict) -> dict:
    """ms per update of the replay's part of training, per variant and stored size."""
    sizes = [("proprio", int(n)) for n in opts["replay_sizes"].split(",") if n]
    if opts["replay_pixels"]:
        sizes.append(("pixels", opts["replay_pixels"]))
    names = [n for n in REPLAY_VARIANTS if opts["replay_before"] or n == "after"]
    rows = []
    for kind, size in sizes:
        print(f"replay, {kind}, {size:,} stored steps: {', '.join(names)}", flush=True)
        rows.append(replay_row(kind, size, names, opts["replay_rounds"]))
    return {"updates_per_extend": UPDATES_PER_EXTEND, "rows": rows}


def replay_row(kind: str, size: int, names: list[str], rounds: int) -> dict:
    import os
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    try:
        replays = {n: filled_replay(kind, size, REPLAY_VARIANTS[n][0], scratch / n) for n in names}
        for replay in replays.values():
            replay.sample()  # each sampler builds its index once, outside the timing
        os.sync()  # the fill's dirty memmap pages are written back now, not while timing
        cold, warm = {n: [] for n in names}, {n: [] for n in names}
        for _ in range(rounds):
            for name, replay in replays.items():
                _, write, gather = REPLAY_VARIANTS[name]
                cold[name].append(replay_cycle(replay, kind, write, gather))
                warm[name].append(replay_cycle(replay, kind, write, gather))
        row = {"obs": kind, "stored_steps": len(next(iter(replays.values())))}
        row["variants"] = {
            n: {"warm": _median_parts(warm[n]), "cold": _median_parts(cold[n])} for n in names
        }
        return row
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def filled_replay(kind: str, size: int, sampler: str, scratch: Path):
    """A memmap StepReplay (the default storage) holding ``size`` steps of one stream,
    episodes of 1000 steps, filled in large extends (no sampling in between)."""
    from dreamer_trl.replay import StepReplay

    obs = REPLAY_SHAPES[kind][0]
    replay = StepReplay(
        size, 16, 65, list(obs), scratch_dir=str(scratch), online=False, sampler=sampler
    )
    # An extend larger than the storage would write its wrapped rows twice in one call.
    chunk = min(50_000 if kind == "proprio" else 10_000, size // 2)
    done = 0
    while len(replay) < size:
        n = min(chunk, size - len(replay))
        replay.extend(replay_transitions(kind, done, n))
        done += n
    return replay


def replay_transitions(kind: str, first: int, n: int):
    """``n`` collector transitions of one env (obs, action, latents), 1000-step episodes."""
    from tensordict import TensorDict

    from dreamer_trl.transforms import INCOMING_REWARD

    obs, act, deter, classes = REPLAY_SHAPES[kind]
    k = torch.arange(first, first + n)
    done = ((k + 1) % 1000 == 0).unsqueeze(-1)
    g = torch.Generator().manual_seed(first)
    observations = {}
    for key, shape in obs.items():
        if len(shape) == 3:  # a pool of frames: filling must not hold n images twice
            pool = torch.randint(0, 256, (64, *shape), generator=g, dtype=torch.uint8)
            observations[key] = pool[k % 64]
        else:
            observations[key] = torch.randn(n, *shape, generator=g)
    nxt = {
        "reward": torch.zeros(n, 1),
        "done": done,
        "terminated": torch.zeros_like(done),
        "truncated": done,
        "deter": torch.zeros(n, deter),
        "stoch": torch.zeros(n, 32, classes),
        **observations,
    }
    root = {
        "action": torch.rand(n, act, generator=g),
        "is_init": (k % 1000 == 0).unsqueeze(-1),
        INCOMING_REWARD: torch.zeros(n, 1),
        **observations,
    }
    return TensorDict({**root, "next": nxt}, [n])


def replay_cycle(replay, kind: str, write: str, gather: str = "replay") -> dict[str, float]:
    """One collector batch of work; seconds per update of extend, sample, write-back."""
    _, _, deter_dim, classes = REPLAY_SHAPES[kind]
    deter = torch.randn(16, 64, deter_dim)
    stoch = torch.zeros(16, 64, 32, classes)
    write_back = replay.write_back if write == "direct" else _storage_set_write_back(replay)
    sample = replay.sample if gather == "replay" else _buffer_sample(replay)
    faults = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    replay.extend(replay_transitions(kind, replay.stream_steps[0], UPDATES_PER_EXTEND))
    spent = {"extend": time.perf_counter() - start, "sample": 0.0, "write_back": 0.0}
    for _ in range(UPDATES_PER_EXTEND):
        t0 = time.perf_counter()
        batch = sample()
        t1 = time.perf_counter()
        write_back(batch, deter, stoch)
        spent["sample"] += t1 - t0
        spent["write_back"] += time.perf_counter() - t1
    per_update = {k: v / UPDATES_PER_EXTEND for k, v in spent.items()}
    after = resource.getrusage(resource.RUSAGE_SELF)  # page faults: memmap pages (re)mapped
    per_update["minor_faults"] = (after.ru_minflt - faults.ru_minflt) / UPDATES_PER_EXTEND
    per_update["major_faults"] = (after.ru_majflt - faults.ru_majflt) / UPDATES_PER_EXTEND
    return per_update


def _buffer_sample(replay):
    """StepReplay.sample's uniform part before issue 20 (the 'before' rows): through
    TorchRL's buffer.sample, whose slice sampler reads the rows once for its end markers
    and the buffer once more for the batch."""

    def sample():
        rows = replay.batch_size * replay.seq_len
        td = replay.buffer.sample(batch_size=rows).exclude("next")
        return td.reshape(replay.batch_size, replay.seq_len)

    return sample


def _storage_set_write_back(replay):
    """The write-back before issue 20, kept for the 'before' rows: through
    ``storage.set``, which TorchRL counts as a write of rows its index does not know."""
    from tensordict import TensorDict

    def write_back(batch, deter, stoch) -> None:
        index = batch.get("index")[:, 1:].reshape(-1)
        update = TensorDict(
            {
                "deter": deter.reshape(-1, deter.shape[-1]).to(replay.latent_dtype),
                "stoch": stoch.reshape(-1, *stoch.shape[-2:]).to(replay.latent_dtype),
            },
            [index.numel()],
        )
        replay.buffer.storage.set(index, update, set_cursor=False)

    return write_back


def _median_parts(cycles: list[dict[str, float]]) -> dict[str, float]:
    """Median ms per update of each part and of their sum, and page faults per update,
    over the timed cycles."""
    times = ("extend", "sample", "write_back")
    parts = {f"{k}_ms": statistics.median(c[k] for c in cycles) * 1e3 for k in times}
    parts["total_ms"] = statistics.median(sum(c[k] for k in times) for c in cycles) * 1e3
    for k in ("minor_faults", "major_faults"):
        parts[f"{k}_per_update"] = statistics.median(c[k] for c in cycles)
    return parts


def print_replay_table(replay: dict) -> None:
    print(f"\n== replay ms per update (one extend per {replay['updates_per_extend']} updates; "
          "warm, the cold total, page faults per update) ==")
    print(f"  {'obs':8s} {'stored':>10s} {'variant':13s} {'sample':>8s} {'write_back':>10s} "
          f"{'extend':>8s} {'total':>8s} {'cold':>8s} {'faults':>7s}")
    for row in replay["rows"]:
        for name, v in row["variants"].items():
            w = v["warm"]
            print(f"  {row['obs']:8s} {row['stored_steps']:>10,d} {name:13s} "
                  f"{w['sample_ms']:8.2f} {w['write_back_ms']:10.2f} "
                  f"{w['extend_ms']:8.2f} {w['total_ms']:8.2f} {v['cold']['total_ms']:8.2f} "
                  f"{w['minor_faults_per_update'] + w['major_faults_per_update']:7.0f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
