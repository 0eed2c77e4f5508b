"""Acting throughput per collector vs the number of envs it steps (issue 16):
`python pipelines/bench_envs.py [envs=dmc_walker,torchrl_pendulum] [counts=1,4,16] [steps=1024]`.

For each env config and env count N, builds the training pipeline's own collector
(`collection.make_collector`, `collector.envs=N`, one batched policy call per step) around a
size1m agent's acting policy (eager, sampling) and times `steps` env steps after a warm-up
batch. Prints env steps/s and writes them to results/bench_envs.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.common import compose_config, run_cli  # noqa: E402


def throughput(env: str, envs: int, steps: int) -> float:
    """Env steps per second of one collector stepping ``envs`` envs of ``env``."""
    import torch

    from dreamer_trl.collection import make_collector, make_policy
    from dreamer_trl.envs import make_env
    from dreamer_trl.trainer import make_agent

    cfg = compose_config(
        [f"env={env}", f"collector.envs={envs}", f"collector.frames_per_batch={16 * envs}"]
    )
    probe = make_env(cfg.env, 0)
    agent = make_agent(cfg, probe, torch.device("cpu"))
    policy = make_policy(agent, probe.action_spec)
    probe.close()
    collector = make_collector(cfg, policy, seed=0)
    try:
        batches = iter(collector)
        next(batches)  # warm-up: env construction and first resets
        done, start = 0, time.perf_counter()
        while done < steps:
            done += next(batches).numel()
        return done / (time.perf_counter() - start)
    finally:
        collector.shutdown()


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    unknown = set(args) - {"envs", "counts", "steps", "out"}
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; valid: envs, counts, steps, out")
    names = args.get("envs", "dmc_walker,torchrl_pendulum").split(",")
    counts = [int(n) for n in args.get("counts", "1,4,16").split(",")]
    steps = int(args.get("steps", 1024))
    import torch

    torch.set_num_threads(1)
    rows = []
    for name in names:
        for n in counts:
            fps = throughput(name, n, steps)
            rows.append({"env": name, "envs": n, "env_steps_per_s": round(fps, 1)})
            print(f"{name:>18} envs={n:<3} {fps:8.1f} env steps/s", flush=True)
    out = Path(args.get("out", ROOT / "results" / "bench_envs.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "threads": 1, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
