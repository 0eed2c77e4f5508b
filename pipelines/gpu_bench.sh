#!/usr/bin/env bash
# The GPU speed check, run on a lent device machine (its python3 has torch, CUDA and
# Triton, but none of torchrl, tensordict, hydra): `make device-kit` here first puts their
# wheels in .whl/ (git-ignored), then the device tool runs, with carry [".whl"]:
#   bash pipelines/gpu_bench.sh
# It benchmarks the GPU only (the CPU figures come from this machine's `make bench`) and
# writes bench_gpu.json and its log under $OUT (or results/ when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, torchrl, tensordict; print('torch', torch.__version__, 'torchrl', torchrl.__version__, 'tensordict', tensordict.__version__)"
python3 pipelines/bench.py devices=gpu acting=false memory=false rounds="${ROUNDS:-7}" \
    out="$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
