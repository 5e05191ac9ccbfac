#!/usr/bin/env bash
# The few wheels llmc's CUDA path imports that the GPU machines' image (Python 3.12, torch, triton, transformers,
# onnxruntime) lacks: pydantic and its dependencies (the bundle's typed manifest, the build spec). Unpacked into
# gpu-deps/ (git-ignored, ~6 MiB), which the device run carries and gpu_check.sh puts on PYTHONPATH.
#   bash benchmarks/gpu_deps.sh      (here, with the package registry reachable; then run with carry: [gpu-deps])
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-deps && mkdir -p gpu-deps/wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d gpu-deps/wheels "pydantic==2.14.4"
for wheel in gpu-deps/wheels/*.whl; do python3 -m zipfile -e "$wheel" gpu-deps/; done
rm -rf gpu-deps/wheels
du -sh gpu-deps
