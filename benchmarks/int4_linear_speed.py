"""llmc.Int4Linear alone at batch 1 (llmc's AVX-512 VNNI kernel inside onnxruntime): SmolLM2-135M's body linears
(q|k|v, o, gate|up as Int4LinearGLU, down; int4 RTN g128) chained over `--layers` layers, so the weights stream from
DRAM as in a decode step, and the GB/s of weight bytes (codes + float16 scale and offset) that reaches. Best of 5
rounds of 100 runs.

    python benchmarks/int4_linear_speed.py [--layers 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from llmc.compiler import onnx_int4_linear as i4
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu
from llmc.kernels.quant import GridConfig, quantize_rtn

HIDDEN, INTERMEDIATE, QKV = 576, 1536, 960


def layer_chain(layers: int) -> tuple[int, bytes]:
    """The chained graph's weight bytes and its serialized model."""
    rng = np.random.default_rng(0)
    cfg = GridConfig(4, 128, False)
    weights = [quantize_rtn((rng.standard_normal((n, k)) * 0.05).astype(np.float32), cfg)
               for n, k in ((QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))]
    g, x = GraphBuilder(), "x"
    for layer in range(layers):
        qkv = i4.int4_linear(g, x, f"l{layer}.qkv", weights[0])
        attn = g.op("Slice", qkv, g.weight(f"l{layer}.start", np.array([0])),
                    g.weight(f"l{layer}.end", np.array([HIDDEN])), g.weight(f"l{layer}.axis", np.array([1])))
        h = i4.int4_linear(g, attn, f"l{layer}.o", weights[1])
        h = i4.int4_linear(g, h, f"l{layer}.gate_up", weights[2], glu=True)
        x = i4.int4_linear(g, h, f"l{layer}.down", weights[3])
    per_layer = sum(w.q.shape[0] * w.in_features // 2 + w.scale.size * 4 for w in weights)
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], g.initializers)
    model = helper.make_model(graph, functions=[i4.build_function(op) for op in i4.FUNCTIONS],
                              opset_imports=[helper.make_opsetid("", i4.OPSET), helper.make_opsetid(i4.DOMAIN, 1)])
    return layers * per_layer, model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not fused_cpu.int4_available():
        raise SystemExit("llmc.Int4Linear's kernel does not run here (it needs AVX-512 VNNI)")
    nbytes, model = layer_chain(args.layers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    fused_cpu.register_fused_kernels(options)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)}
    for _ in range(20):
        session.run(None, feed)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            session.run(None, feed)
        best = min(best, (time.perf_counter() - start) / 100)
    print(json.dumps({"layers": args.layers, "threads": args.threads, "weight_mb": round(nbytes / 1e6, 1),
                      "ms_per_run": round(best * 1e3, 3), "gb_s": round(nbytes / best / 1e9, 1)}))


if __name__ == "__main__":
    main()
