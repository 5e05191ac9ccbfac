"""llmc.PagedAttention alone at SmolLM2-135M's shapes (9 heads, 3 KV heads, head size 64, float16 (or
--kv-dtype) pools of 16-token blocks): a decode step of `--batch` sequences at `--context` tokens, layer after layer
over `--layers` separate pools (as in an engine step, so the pools are not in cache), 2 threads. Reports ms
per layer and the KV bytes read per second against this machine's two-core stream rate.

    python benchmarks/attention_speed.py [--batch 64] [--context 400] [--layers 30]
    python benchmarks/attention_speed.py --prefill --batch 8 --context 256 [--bf16-tiles]   (GFLOP/s)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from llmc.compiler import onnx_paged_attention as pa
from llmc.kernels import fused_cpu

HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 9, 3, 64, 4096
BLOCK = int(__import__("os").environ.get("BLOCK", 16))


def session(kv_dtype: str, bf16_tiles: bool = False) -> ort.InferenceSession:
    """One llmc.PagedAttention node with the engine graphs' step plan, on llmc's fused kernel (prefill tiles
    on AMX bf16 tiles with bf16_tiles, as in the int8 graph)."""
    model = pa.build_single_op_model(HEADS, KV_HEADS, HEAD_DIM, kv_dtype, ["NB", BLOCK, KV_HEADS, HEAD_DIM], POSITIONS,
                                     bf16_tiles)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not fused_cpu.register_fused_kernels(options):
        raise SystemExit("llmc's fused CPU kernels do not build or load here")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_feeds(batch: int, context: int, new: int, rng) -> tuple[dict, int]:
    """Inputs of a step of `batch` sequences at `context` tokens, the last `new` of them in the step (1: a
    decode step; `context`: a prefill of whole prompts), the cached ones in shuffled blocks."""
    per_seq = (context + BLOCK - 1) // BLOCK
    num_blocks = batch * per_seq
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, per_seq)
    angles = np.arange(POSITIONS)[:, None] * 10000.0 ** (-np.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    T = batch * new
    feeds = {"q": rng.standard_normal((T, HEADS * HEAD_DIM), dtype=np.float32),
             "k": rng.standard_normal((T, KV_HEADS * HEAD_DIM), dtype=np.float32),
             "v": rng.standard_normal((T, KV_HEADS * HEAD_DIM), dtype=np.float32),
             "positions": np.tile(np.arange(context - new, context), batch), "block_tables": tables,
             "context_lens": np.full(batch, context, np.int32),
             "query_start": np.arange(0, T + 1, new, dtype=np.int32),
             "rope_cos": np.cos(angles).astype(np.float32), "rope_sin": np.sin(angles).astype(np.float32)}
    return feeds, num_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-dtype", default="float16", choices=["float16", "float32", "int8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", action="store_true", help="whole prompts of --context tokens, not a decode")
    parser.add_argument("--bf16-tiles", action="store_true",
                        help="prefill tiles in bf16 (int8 graph): AMX, or AVX-512 BF16 without it")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    s = session(args.kv_dtype, args.bf16_tiles)
    new = args.context if args.prefill else 1
    feeds, num_blocks = step_feeds(args.batch, args.context, new, rng)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    if args.kv_dtype == "int8":  # codes, and their channels' scales
        pools = [[rng.integers(-127, 128, shape, dtype=np.int8) for _ in range(2)] for _ in range(args.layers)]
        feeds.update({name: np.full(KV_HEADS * HEAD_DIM, 0.02, np.float32) for name in pa.SCALES})
    else:
        pools = [[rng.standard_normal(shape, dtype=np.float32).astype(args.kv_dtype) for _ in range(2)]
                 for _ in range(args.layers)]
    bindings = []
    out = np.empty((args.batch * new, HEADS * HEAD_DIM), np.float32)
    for k_pool, v_pool in pools:
        b = s.io_binding()
        for name, x in feeds.items():
            b.bind_cpu_input(name, x)
        b.bind_cpu_input("k_pool", k_pool)
        b.bind_cpu_input("v_pool", v_pool)
        b.bind_output("out", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        bindings.append(b)
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        for b in bindings:
            s.run_with_iobinding(b)
        times.append((time.perf_counter() - start) / args.layers)
    per_layer = min(times[1:])
    result = {"batch": args.batch, "context": args.context, "kv_dtype": args.kv_dtype, "prefill": args.prefill,
              "bf16_tiles": args.bf16_tiles, "ms_per_layer": round(per_layer * 1e3, 3),
              "ms_per_step": round(per_layer * 1e3 * 30, 1)}
    if args.prefill:  # causal: QK^T and PV over (context + 1) / 2 keys per query on average
        flops = 4 * args.batch * args.context * (args.context + 1) / 2 * HEADS * HEAD_DIM
        result["gflops"] = round(flops / per_layer / 1e9, 1)
    else:
        kv_bytes = 2 * args.batch * (args.context - 1) * KV_HEADS * HEAD_DIM * np.dtype(args.kv_dtype).itemsize
        result["kv_gb_s"] = round(kv_bytes / per_layer / 1e9, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
