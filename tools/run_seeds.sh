#!/usr/bin/env bash
# Train once per seed, then write submission.json from the new logs.
#
# Usage: tools/run_seeds.sh SEED [SEED...] [-- make_submission.py args]
#   e.g. tools/run_seeds.sh 1337 42 2024 -- --name my_run --author me
#
# On CUDA: SEED=s RUN_ID=... torchrun --standalone --nproc_per_node=$NPROC train_gpt.py
# (NPROC defaults to the GPU count). Elsewhere: python train_gpt.py (its CPU preset), and the
# summary is written with --non-record. Stops at the first failed run.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python), NPROC,
#   DEVICE=cuda|cpu (skip detection), RUN_PREFIX (default: seeds_<UTC timestamp>),
#   DRY_RUN=1 (print the commands instead of running them).
set -euo pipefail

cd "$(dirname "$0")/.."

seeds=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
    [[ "$1" =~ ^[0-9]+$ ]] || { echo "run_seeds: seed '$1' is not a non-negative integer" >&2; exit 2; }
    seeds+=("$1")
    shift
done
if [[ $# -gt 0 ]]; then shift; fi  # drop the "--"
if [[ ${#seeds[@]} -eq 0 ]]; then
    echo "usage: tools/run_seeds.sh SEED [SEED...] [-- make_submission.py args]" >&2
    exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [[ -z "${DEVICE:-}" ]]; then
    if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        DEVICE=cuda
    else
        DEVICE=cpu
    fi
fi
if [[ "$DEVICE" == cuda && -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
fi
prefix="${RUN_PREFIX:-seeds_$(date -u +%Y%m%d_%H%M%S)}"

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi
}

mkdir -p logs
logs=()
for seed in "${seeds[@]}"; do
    run_id="${prefix}_seed${seed}"
    log="logs/${run_id}.txt"
    echo "run_seeds: seed $seed ($DEVICE) -> $log" >&2
    if [[ "$DEVICE" == cuda ]]; then
        cmd=(torchrun --standalone "--nproc_per_node=$NPROC" train_gpt.py)
    else
        cmd=("$PYTHON" train_gpt.py)
    fi
    status=0
    run env SEED="$seed" RUN_ID="$run_id" "${cmd[@]}" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "run_seeds: seed $seed failed (exit $status); see $log" >&2
        exit "$status"
    fi
    if [[ "${DRY_RUN:-0}" != 1 && ! -f "$log" ]]; then
        echo "run_seeds: seed $seed finished but wrote no $log" >&2
        exit 1
    fi
    logs+=("$log")
done

extra=("$@")
[[ "$DEVICE" == cuda ]] || extra+=(--non-record)
run "$PYTHON" tools/make_submission.py "${logs[@]}" "${extra[@]}"
