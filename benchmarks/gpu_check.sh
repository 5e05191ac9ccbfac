#!/usr/bin/env bash
# The prepared check for a lent GPU machine (issue 16): the Triton kernels against their torch references on the
# GPU, decode attention bandwidth vs the device's copy bandwidth, the int4 GEMV vs torch's fp16 matmul. Needs only
# torch and triton (the device image has both; nothing is installed). Writes $OUT/gpu_kernels.json; a few minutes.
#   device run:  bash benchmarks/gpu_check.sh           (timeout_s 480)
#   dry run here: DRY_RUN=1 bash benchmarks/gpu_check.sh (TRITON_INTERPRET=1, tiny shapes, on the CPU)
# Not in it yet: llmc's CUDA engine end to end vs transformers + torch.compile (that engine is not written yet).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
# The repository's packages as `llmc.*` without installing it (pyproject maps llmc.kernels to kernels/, ...).
SHIM="$(mktemp -d)"
mkdir "$SHIM/llmc"
cp llmc/*.py "$SHIM/llmc/"
for pkg in compiler passes kernels artifacts runtime; do ln -s "$PWD/$pkg" "$SHIM/llmc/$pkg"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export TRITON_INTERPRET=1
  timeout 600 python benchmarks/gpu_kernels.py --dry-run --out "$OUT/gpu_kernels.json"
else
  timeout 420 python benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json"
fi
echo "wrote $OUT/gpu_kernels.json"
