#!/usr/bin/env bash
# The prepared check for a lent GPU machine (issue 16), at most ~8 minutes, nothing installed:
#   1. gpu_kernels.py: the Triton kernels against their torch references, decode attention bandwidth vs the device's
#      copy bandwidth, the int4 GEMV vs torch's fp16 matmul, and both over a few tile sizes (which defaults the
#      device wants) -> $OUT/gpu_kernels.json
#   2. gpu_e2e.py: llmc's CUDA engine (LLM, device cuda) vs transformers generate (static cache, torch.compile) on
#      the same random weights of SmolLM2's and a 1B Llama's shapes, batch 1/16/64 -> $OUT/gpu_e2e.json
# The image lacks pydantic: `bash benchmarks/gpu_deps.sh` here first, and run with carry: ["gpu-deps"].
#   device run:  bash benchmarks/gpu_check.sh           (timeout_s 540)
#   dry run here: DRY_RUN=1 bash benchmarks/gpu_check.sh (TRITON_INTERPRET=1, tiny shapes, on the CPU)
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
if ! python -c "import pydantic" 2>/dev/null; then
  [[ -d gpu-deps ]] || { echo "pydantic is missing and gpu-deps/ was not carried (bash benchmarks/gpu_deps.sh)"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$PWD/gpu-deps"
fi
python - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export TRITON_INTERPRET=1
  timeout 600 python benchmarks/gpu_kernels.py --dry-run --out "$OUT/gpu_kernels.json"
  timeout 900 python benchmarks/gpu_e2e.py --dry-run --out "$OUT/gpu_e2e.json"
else
  timeout 170 python benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json" || echo "gpu_kernels.py failed ($?)"
  timeout 300 python benchmarks/gpu_e2e.py --budget-s 250 --out "$OUT/gpu_e2e.json" || echo "gpu_e2e.py failed ($?)"
fi
ls -l "$OUT"
