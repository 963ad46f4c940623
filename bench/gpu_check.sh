#!/usr/bin/env bash
# One-command GPU check (issue 9), run from anywhere; no network needed.
#   bash bench/gpu_check.sh              # full size on the GPU: < ~8 minutes on one H100
#   bash bench/gpu_check.sh --cpu-smoke  # tiny sizes on CPU, < 60 s
# Results: $OUT (device machine) or ./gpu_check_out/: gpu_check.json, gpu_check_summary.txt, gpu_check.log.
# PYTHON picks the interpreter (default: the repo's .venv if present, else python3).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null 2>&1 && PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
