#!/usr/bin/env bash
# Serving benchmark against vLLM for CPU, same machine, same run: each system on a fresh server, one
# at a time, the same workload through HTTP streaming (llmc bench --mode online: 64 requests queued at
# once, prompts 30-500 tokens, outputs 30-250 with EOS ignored, seed 0). Needs the peers of
# ../shared/peers/setup.sh vllm and the bundles named below (llmc build examples/<name>.yaml).
#
#     [BUNDLES="a b"] [LLMC_ARGS="--max-num-batched-tokens 1024"] bash benchmarks/serving_vs_vllm.sh [ROUNDS]   -> benchmarks/results/serving_vs_vllm/*.json
#     LLMC_VARIANTS="|--policy prefill-first" bash benchmarks/serving_vs_vllm.sh   # each bundle once per variant (extra args)
#     VLLM_SERVE=~/peers/vllm-serve-guarded.sh ...   # a vllm-serve.sh whose wrapper guards main (vLLM spawns its engine)
#     TAG=sampled BENCH_ARGS="--temperature 0.8 --top-p 0.9" bash benchmarks/serving_vs_vllm.sh  # a sampled workload
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
OUT=benchmarks/results/serving_vs_vllm
PEERS=${PEERS:-$HOME/peers}
mkdir -p "$OUT"
wait_up() {  # until the server answers /v1/models (or 300 s)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done
  echo "server on port $1 did not come up" >&2; return 1
}
measure() {  # name port pid
  set -- "$1${TAG:+-$TAG}" "$2" "$3"
  wait_up "$2"
  # shellcheck disable=SC2086  # BENCH_ARGS splits into words on purpose
  llmc bench "out/$WORKLOAD_BUNDLE" --mode online --url "http://127.0.0.1:$2" ${BENCH_ARGS:-} \
    --out "$OUT/$1-$(date +%H%M)-round$round.json" >/dev/null
  kill "$3"; wait "$3" 2>/dev/null || true
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], round(r['output_tok_s'],1), 'tok/s, TTFT p50',
             round(r['ttft_ms']['p50']/1000,2), 's, completed', r['completed'], '/', r['requests'])" "$(ls -t "$OUT"/$1-*-round$round.json | head -1)" "$1"
}
BUNDLES=${BUNDLES:-smollm2-135m-int8-prefill smollm2-135m-gptq smollm2-135m smollm2-135m-int4}
WORKLOAD_BUNDLE=${BUNDLES%% *}  # any bundle of the model: the workload needs its vocabulary only
for round in $(seq "$ROUNDS"); do
  for bundle in $BUNDLES; do
    IFS='|' read -ra variants <<< "${LLMC_VARIANTS:-}"
    for variant in "${variants[@]:-}"; do
      tag=$(echo "$variant" | tr -cd 'a-z0-9-' | sed 's/^--*//')
      # shellcheck disable=SC2086  # the args split into words on purpose
      llmc serve "out/$bundle" --port 18801 ${LLMC_ARGS:-} $variant >/dev/null 2>&1 &
      measure "llmc-$bundle${tag:+-$tag}" 18801 $!
    done
  done
  PORT=18802 DTYPE=bfloat16 "${VLLM_SERVE:-$PEERS/vllm-serve.sh}" >/dev/null 2>&1 &
  measure vllm-bf16 18802 $!
done
