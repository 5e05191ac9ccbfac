"""llmc.Int8Linear: a linear layer with int8 weights and int8 activations, quantized per token.

    y[M, N] = (q_x[M, K] . w[N, K]^T) * x_scale[M, 1] * w_scale[N]
    x_scale = max|x| per row / 127 (1 for an all-zero row), q_x = round(x / x_scale) in [-127, 127]

Each row (token) has its own scale, so a token's result never depends on the other tokens of the
step. The op's ONNX function body computes this with the standard MatMulInteger (activations as
uint8 with zero point 128); llmc's CPU kernel library runs it on AMX tiles where the CPU has them
(kernels/cpu/int8_linear.cc).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder

DOMAIN = "llmc"
OP_TYPE = "Int8Linear"
OPSET = 23


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: (codes int8 [N, K], scales float32 [N])."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def reference(x: np.ndarray, codes: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """The op in numpy (the tests' reference)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    x_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    qx = np.rint(x / x_scale).astype(np.int32)
    return (qx @ codes.astype(np.int32).T).astype(np.float32) * x_scale * w_scale


def build_function() -> onnx.FunctionProto:
    """The op's portable body (x, w, w_scale) -> y."""
    g = GraphBuilder("i8_")
    amax = g.op("ReduceMax", g.op("Abs", "x"), g.const([1]), keepdims=1)  # [M, 1]
    positive = g.op("Greater", amax, g.const(0.0, np.float32))
    x_scale = g.op("Where", positive, g.op("Div", amax, g.const(127.0, np.float32)), g.const(1.0, np.float32))
    shifted = g.op("Add", g.op("Round", g.op("Div", "x", x_scale)), g.const(128.0, np.float32))
    qx = g.op("Cast", g.op("Clip", shifted, g.const(1.0, np.float32), g.const(255.0, np.float32)),
              to=onnx.TensorProto.UINT8)  # [M, K]: int8 codes + 128
    acc = g.op("MatMulInteger", qx, g.op("Transpose", "w", perm=[1, 0]), g.const(128, np.uint8))  # [M, N] int32
    scaled = g.op("Mul", g.op("Cast", acc, to=onnx.TensorProto.FLOAT), x_scale)
    g.nodes.append(helper.make_node("Mul", [scaled, "w_scale"], ["y"], name="i8_y"))
    return helper.make_function(DOMAIN, OP_TYPE, ["x", "w", "w_scale"], ["y"], g.nodes,
                                opset_imports=[helper.make_opsetid("", OPSET)])


def int8_linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray) -> str:
    """Add an llmc.Int8Linear node over weight [N, K] (float32, quantized here)."""
    codes, scale = quantize_weight(weight)
    return g.op(OP_TYPE, x, g.weight(f"{name}.qweight_int8", codes), g.weight(f"{name}.scale_int8", scale),
                domain=DOMAIN, name=f"{name}.int8_linear")
