#!/usr/bin/env bash
# Here, before a GPU run: download the pure-Python wheels the GPU machine lacks into .whl/ (git-ignored), to be
# carried with the call (`carry: [".whl"]`). The machine has torch, transformers, accelerate, safetensors, numpy,
# pytest and hypothesis; it lacks this project's pinned peft, and bitsandbytes (43 MB: test_gpu.py checks its CUDA
# optimizer kernels against the importance's mirrors, which follow its CPU kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
peft_version=$(python3 -c "import peft; print(peft.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "peft==${peft_version}"
bnb_version=$(python3 -c "import bitsandbytes; print(bitsandbytes.__version__)" 2>/dev/null | tail -1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${bnb_version}"
ls -la .whl
