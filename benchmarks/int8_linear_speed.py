"""llmc.Int8Linear alone (llmc's kernel, AMX or AVX-512 VNNI, inside onnxruntime, 2 threads, output bound once so no
page faults are timed) at SmolLM2-135M's shapes: ms per call and TOPS (2 M K N / time), the best of 5 rounds.

    python benchmarks/int8_linear_speed.py [--outliers 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from llmc.compiler import onnx_int8_linear as il
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N): qkv, o, gate|up, down, head


def session(n: int, k: int, outliers: int) -> ort.InferenceSession:
    g = GraphBuilder()
    weight = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    g.nodes.append(helper.make_node("Identity", [il.int8_linear(g, "x", "lin", weight, np.arange(outliers))], ["y"]))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], g.initializers)
    model = helper.make_model(graph, functions=[il.build_function(op) for op in il.FUNCTIONS],
                              opset_imports=[helper.make_opsetid("", il.OPSET), helper.make_opsetid(il.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not fused_cpu.register_fused_kernels(options) or not fused_cpu.int8_backend():
        raise SystemExit("llmc's AMX kernel does not run here")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outliers", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512, 2048])
    args = parser.parse_args()
    for k, n in SHAPES:
        s = session(n, k, args.outliers)
        for m in args.rows if n < 49152 else [16, 64]:
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            y = np.empty((m, n), np.float32)
            binding = s.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_output("y", "cpu", 0, np.float32, y.shape, y.ctypes.data)
            for _ in range(3):
                s.run_with_iobinding(binding)
            reps = max(5, int(1e9 / (2 * m * k * n)))
            rounds = []  # the best of 5 rounds: this VM's throughput swings between phases
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(reps):
                    s.run_with_iobinding(binding)
                rounds.append((time.perf_counter() - start) / reps)
            seconds = min(rounds)
            print(f"K={k:5d} N={n:5d} M={m:5d}: {seconds * 1e3:7.3f} ms  {2 * m * k * n / seconds / 1e12:5.2f} TOPS")


if __name__ == "__main__":
    main()
