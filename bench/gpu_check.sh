#!/usr/bin/env bash
# One-command GPU check (issues 9, 18), run from anywhere; no network needed.
#   bash bench/gpu_check.sh              # full size on the GPU: ~8 minutes on one H100 (--budget 480)
#   bash bench/gpu_check.sh --cpu-smoke  # tiny sizes on CPU, ~1-2 minutes
# Results: $OUT (device machine) or ./gpu_check_out/: gpu_check.json, gpu_check_summary.txt, gpu_check.log.
# PYTHON picks the interpreter (default: the repo's .venv if present, else python3).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null 2>&1 && PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
# A runtime dependency the GPU image may lack (brotli, the artifact's compressor), from wheels carried in .whl/
if ! "$PYTHON" -c "import brotli" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/pgolf_site .whl/*.whl \
        && export PYTHONPATH="/tmp/pgolf_site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
