#!/usr/bin/env bash
# The first-GPU check (issue 20): correctness, then speed, in one run of under 10 minutes.
#
# On a lent device machine (a CUDA torch, nothing else; no network, maybe no git): here
# `make device-kit` puts every other wheel the check imports, dependencies resolved, in .whl/
# (git-ignored); then the device tool runs, with carry [".whl"]:
#     bash pipelines/gpu_bench.sh
# Each step runs under its own timeout and writes <step>.json under $OUT, else
# results/gpu_check/; summary.json lists every step's status, exit code and seconds, and
# log.txt holds every step's output (8 files: what the device tool brings back):
#   preflight  versions, the GPU, nvidia-smi                        (pipelines/gpu_check.py)
#   parity     one update on the CPU and the device, same weights, batch and noise:
#              losses within 1e-4 (fp32 imagination) and 2e-2 (bf16)
#   sync       host-device syncs per update and per sample → update → write_back
#   trainer    Pendulum, tiny: a run with a checkpoint, its resume, the all-on-device run
#   bench      pipelines/bench.py: the size1m update (and size12m pixels) and acting latency
#              on the device
#   replay     pipelines/bench.py: the replay's ms per update at 10k and 1M stored steps, on
#              this machine's CPU (the replay lives in host memory)
#   switches   ms per update with TF32 matmuls, with the next batch prefetched, with CUDA
#              graphs (compile.mode=reduce-overhead): last, so a short lease skips it first;
#              its JSON goes into summary.json ("switches")
# A failed step is recorded and the next one runs. The script exits 1 if any step failed.
#
# Environment: DEVICE (cuda; cpu for the dry run, tests/test_gpu_bench.py), QUICK=1 (tiny
# sizes), STEPS (the steps to run, in order; default all), TORCHRL=0 (no TorchRL baseline
# in the bench), ROUNDS (bench rounds, 7), PYTHON (python3), KIT (.whl), TOTAL_S (560: no
# step starts past this and each is cut to what is left), T_<STEP> (a step's timeout, s;
# T_RUN: each of the trainer step's three runs).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu_check}"
py="${PYTHON:-python3}"
dev="${DEVICE:-cuda}"
quick="${QUICK:-0}"
kit="${KIT:-.whl}"
total="${TOTAL_S:-560}"
mkdir -p "$out"
work="$(mktemp -d)"  # logs, the trainer's run dirs, the installed kit: not brought back
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

if compgen -G "$kit/*.whl" >/dev/null; then  # the lent machine: install the kit aside
    site="$work/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$kit"/*.whl || { echo "could not install the wheels in $kit" >&2; exit 1; }
    export PYTHONPATH="$site:$PWD"
else  # here (the dry run): this environment already has them
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! command -v git >/dev/null; then  # the trainer asks git for the commit: "unknown" then
    shim="$work/bin" && mkdir -p "$shim"
    printf '#!/bin/sh\nexit 1\n' >"$shim/git" && chmod +x "$shim/git"
    export PATH="$shim:$PATH"
fi

if [ "$quick" = 1 ]; then
    q=(--quick)
    bench=(devices=cpu quick=true rounds=1 warmup=0)
    replay=(replay_sizes=2000 replay_pixels=0 replay_rounds=1)
else
    q=()
    bench=(devices=gpu rounds="${ROUNDS:-7}")
    replay=(replay_sizes=10000,1000000 replay_pixels=0 replay_rounds=3)
fi
bench+=(acting=false memory=false replay=false)
replay+=(devices=none acting=false memory=false latency=false replay_before=false)
[ "${TORCHRL:-1}" = 0 ] && bench+=(torchrl=false)

start=$SECONDS
failed=0
rows=()
step() {  # step NAME TIMEOUT CMD...: run CMD under the timeout, record how it went
    local name=$1 limit=$2 left rc status began
    shift 2
    left=$((total - (SECONDS - start)))
    if [ "$left" -lt 10 ]; then
        rows+=("{\"step\": \"$name\", \"status\": \"skipped\", \"note\": \"no time left\"}")
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s)"
    began=$SECONDS
    timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$rc" = 0 ] || failed=1
    tail -n 3 "$work/$name.log"
    rows+=("{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - began)), \"timeout\": $limit, \"json\": \"$name.json\"}")
}

check=("$py" pipelines/gpu_check.py)
opts=(--device "$dev" "${q[@]}")
for name in ${STEPS:-preflight parity sync trainer bench replay switches}; do
    json=(--out "$out/$name.json")
    case $name in
        preflight) step preflight "${T_PREFLIGHT:-90}" "${check[@]}" preflight "${opts[@]}" "${json[@]}" ;;
        parity) step parity "${T_PARITY:-120}" "${check[@]}" parity "${opts[@]}" "${json[@]}" ;;
        sync) step sync "${T_SYNC:-120}" "${check[@]}" sync "${opts[@]}" "${json[@]}" ;;
        trainer) step trainer "${T_TRAINER:-270}" "${check[@]}" trainer "${opts[@]}" "${json[@]}" \
            --limit "${T_RUN:-120}" --runs "$work/trainer_runs" ;;
        bench) step bench "${T_BENCH:-300}" "$py" pipelines/bench.py "${bench[@]}" \
            out="$out/bench.json" ;;
        replay) step replay "${T_REPLAY:-90}" "$py" pipelines/bench.py "${replay[@]}" \
            out="$out/replay.json" ;;
        switches) step switches "${T_SWITCHES:-150}" "${check[@]}" switches "${opts[@]}" \
            --out "$work/switches.json" ;;  # into summary.json: the tool brings back 8 files
        *) echo "unknown step $name (valid: preflight parity sync trainer bench replay switches)" >&2
           exit 2 ;;
    esac
done

{
    printf '{"device": "%s", "quick": %s, "seconds": %d, "ok": %s, "switches": %s, "steps": [\n' \
        "$dev" "$([ "$quick" = 1 ] && echo true || echo false)" $((SECONDS - start)) \
        "$([ "$failed" = 0 ] && echo true || echo false)" \
        "$(cat "$work/switches.json" 2>/dev/null || echo null)"
    for i in "${!rows[@]}"; do
        printf '  %s%s\n' "${rows[$i]}" "$([ "$i" -lt $((${#rows[@]} - 1)) ] && echo ,)"
    done
    printf ']}\n'
} >"$out/summary.json"
for name in ${STEPS:-preflight parity sync trainer bench replay switches}; do  # in step order
    log="$work/$name.log"  # its last 400 lines
    [ -e "$log" ] && { echo "===== $name"; tail -n 400 "$log"; }
done >"$out/log.txt"
cat "$out/summary.json"
exit "$failed"
