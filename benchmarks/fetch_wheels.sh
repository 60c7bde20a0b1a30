#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh needs on a lent GPU machine and that its image lacks,
# into .whl/ at the repository root (ignored by git; name it in the device call's `carry`).
# The GPU image (Python 3.12) has torch, triton, transformers, peft, timm, huggingface_hub (1.33),
# safetensors, requests, regex, filelock, Pillow, numpy: only diffusers itself is missing
# (its importlib_metadata requirement is not imported on Python >= 3.8).
# Usage (here, with internet to PyPI):  bash benchmarks/fetch_wheels.sh [DIFFUSERS_VERSION]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VER=${1:-0.42.1}
PY=${PYTHON:-python3}
mkdir -p "$REPO/.whl"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$REPO/.whl" "diffusers==$VER"
ls -la "$REPO/.whl"
