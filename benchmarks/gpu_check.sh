#!/usr/bin/env bash
# The GPU check in one line, on the GPU machine: `bash benchmarks/gpu_check.sh` (extra arguments go to gpu_check.py).
# Installs the wheels carried in .whl/ (made here by benchmarks/gpu_wheels.sh) into /tmp/site, uses this checkout
# without installing it (the machine's own torch / transformers / accelerate stay), writes everything under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-output}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
