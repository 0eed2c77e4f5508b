"""Data-parallel learner benchmark: `.venv/bin/python pipelines/bench_ddp.py [k=v …]`.

Times the full size1m update (B16×T64, walker-shaped vectors, the pipeline's compiled RSSM
steps) in one process and then in ``ranks`` gloo processes on this machine
(``dreamer_trl.distributed``: each rank its own batch, one gradient all-reduce an update),
one torch thread per process. Prints ms per update, sequences trained per second, the
all-reduce's share, and the scaling efficiency (ranks' sequences/s over ``ranks`` × one
process's); writes results/bench_ddp.json. On a CPU the ranks share the machine's cores
and memory bandwidth: the figure says what the all-reduce and the sharing cost, not what
separate GPUs would gain.

Options: ranks=2, updates=6 (timed, median reported), warmup=2, batch=16, seq=64,
compile_steps=true, out=results/bench_ddp.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.bench import SIZE1M, git_commit, make_ours, parse_options  # noqa: E402
from pipelines.common import ConfigError, run_cli  # noqa: E402

OPTIONS = {"ranks": 2, "updates": 6, "warmup": 2, "batch": 16, "seq": 64,
           "compile_steps": True, "out": "results/bench_ddp.json"}
OBS = {"observation": (24,)}


def parse(argv: list[str]) -> dict:
    opts = parse_options(argv, OPTIONS)
    if opts["ranks"] < 2:
        raise ConfigError(f"ranks={opts['ranks']}: must be >= 2 (1 is the baseline it runs anyway)")
    return opts


def time_updates(opts: dict, world=None) -> dict:
    """Median ms of ``updates`` updates (after ``warmup``), and of their all-reduces."""
    torch.set_num_threads(1)
    update, params, agent, _ = make_ours(
        SIZE1M, OBS, "cpu", compiled="steps" if opts["compile_steps"] else None,
        batch_shape=(opts["batch"], opts["seq"]),
    )
    reduce_ms: list[float] = []
    if world is not None:
        agent.data_parallel(world)
        inner = agent.grad_average

        def timed_average(flags):
            start = time.perf_counter()
            out = inner(flags)
            reduce_ms.append(1e3 * (time.perf_counter() - start))
            return out

        agent.grad_average = timed_average
    for _ in range(opts["warmup"]):
        update()
    times = []
    for _ in range(opts["updates"]):
        if world is not None:
            dist.barrier()  # start together: the slowest rank sets each update's time
        start = time.perf_counter()
        update()
        times.append(1e3 * (time.perf_counter() - start))
    timed_reduces = reduce_ms[opts["warmup"]:]
    return {
        "params": params,
        "update_ms": statistics.median(times),
        "allreduce_ms": statistics.median(timed_reduces) if timed_reduces else 0.0,
    }


def _rank(rank: int, size: int, init: str, opts: dict, out: str) -> None:
    from dreamer_trl.distributed import World

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        result = time_updates(opts, World(rank, size, rank))
        worst = torch.tensor([result["update_ms"], result["allreduce_ms"]])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            result.update(update_ms=float(worst[0]), allreduce_ms=float(worst[1]))
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    opts = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"one process: size1m update, B{opts['batch']}xT{opts['seq']}", flush=True)
    single = time_updates(opts)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        print(f"{opts['ranks']} gloo ranks, same update each", flush=True)
        mp.spawn(_rank, args=(opts["ranks"], f"file://{Path(tmp) / 'init'}", opts, str(out)),
                 nprocs=opts["ranks"], join=True)
        multi = json.loads(out.read_text())
    b, n = opts["batch"], opts["ranks"]
    rows = {
        "1 process": {**single, "seqs_per_s": 1e3 * b / single["update_ms"]},
        f"{n} ranks": {**multi, "seqs_per_s": 1e3 * n * b / multi["update_ms"]},
    }
    efficiency = rows[f"{n} ranks"]["seqs_per_s"] / (n * rows["1 process"]["seqs_per_s"])
    print(f"{'':10s} {'ms/update':>10s} {'all-reduce ms':>14s} {'seqs/s':>8s}")
    for name, row in rows.items():
        print(f"{name:10s} {row['update_ms']:10.1f} {row['allreduce_ms']:14.2f} "
              f"{row['seqs_per_s']:8.2f}")
    print(f"scaling efficiency {efficiency:.2f} (1.00: {n} ranks train {n}x the sequences/s); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    report = {"options": opts, "rows": rows, "efficiency": efficiency, "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "load_before": os.getloadavg()[0]}
    path = ROOT / opts["out"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
