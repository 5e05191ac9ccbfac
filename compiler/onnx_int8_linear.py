"""llmc.Int8Linear: a linear layer with int8 weights and int8 activations, quantized per token and block.

    y[M, N] = sum_b (q_x[M, b] . w[N, b]^T) * x_scale[M, b] * w_scale[N, b]     b: blocks of 64 input channels
    x_scale[m, b] = max|x[m, b]| / 127 (1 for an all-zero block), q_x = round(x / x_scale) in [-127, 127]

Each token and block of 64 input channels has its own scale, so a token's result never depends on
the other tokens of the step and an outlier channel costs precision in its block only (one scale per
token lost 3.5% perplexity on SmolLM2); weights have a scale per output channel and block, which also
holds group-quantized int4 weights almost exactly. The op's ONNX function body computes it with the standard
MatMulInteger (activations as uint8 with zero point 128); llmc's CPU kernel library runs it on AMX
tiles where the CPU has them (kernels/cpu/int8_linear.cc). K must be a multiple of 64.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder

DOMAIN = "llmc"
OP_TYPE = "Int8Linear"
OPSET = 23
BLOCK = 64  # input channels per activation scale


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel and block of 64 inputs: (codes int8 [N, K], scales float32 [N, K/64])."""
    n, k = w.shape
    wb = w.reshape(n, k // BLOCK, BLOCK)
    amax = np.abs(wb).max(axis=2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # [N, B]
    codes = np.clip(np.rint(wb / scale[..., None]), -127, 127).astype(np.int8).reshape(n, k)
    return codes, scale


def exact_codes(q) -> tuple[np.ndarray, np.ndarray] | None:
    """A QuantizedWeight's int4 codes as this op's weight, exactly (q - zero, with each group's scale on its
    blocks of 64), when its groups are whole blocks of 64 and its zero points integers; else None."""
    if q.bits != 4 or q.block_size % BLOCK or q.in_features % BLOCK or (q.zero is not None and q.zero.dtype != np.uint8):
        return None
    n, k = q.q.shape[0], q.in_features
    zero = q.zero.astype(np.int16)[..., None] if q.zero is not None else np.int16(8)
    codes = (q.q.astype(np.int16) - zero).reshape(n, -1)[:, :k].astype(np.int8)  # in [-15, 15]
    scales = np.repeat(q.scale, q.block_size // BLOCK, axis=1)[:, :k // BLOCK].astype(np.float32)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales)


def reference(x: np.ndarray, codes: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """The op in numpy (the tests' reference)."""
    m, k = x.shape
    xb = x.reshape(m, k // BLOCK, BLOCK)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    x_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # [M, B, 1]
    qx = np.rint(xb / x_scale).astype(np.int32)
    wb = codes.astype(np.int32).reshape(codes.shape[0], k // BLOCK, BLOCK)  # [N, B, 64]
    parts = np.einsum("mbk,nbk->mbn", qx, wb).astype(np.float32)  # [M, B, N]
    return (parts * x_scale * w_scale.T[None]).sum(axis=1)


def _block_codes(g: GraphBuilder, x: str) -> tuple[str, str, str]:
    """x [M, K] in blocks of 64: (blocks [M, B, 64], rounded codes as float [M, B, 64], scales [M, B, 1])."""
    xb = g.op("Reshape", x, g.const([0, -1, BLOCK]))  # [M, B, 64]
    amax = g.op("ReduceMax", g.op("Abs", xb), g.const([2]), keepdims=1)  # [M, B, 1]
    positive = g.op("Greater", amax, g.const(0.0, np.float32))
    x_scale = g.op("Where", positive, g.op("Div", amax, g.const(127.0, np.float32)), g.const(1.0, np.float32))
    return xb, g.op("Round", g.op("Div", xb, x_scale)), x_scale


def build_function() -> onnx.FunctionProto:
    """The op's portable body (x, w, w_scale) -> y."""
    g = GraphBuilder("i8_")
    xb, codes, x_scale = _block_codes(g, "x")
    shifted = g.op("Add", codes, g.const(128.0, np.float32))
    qx = g.op("Cast", g.op("Clip", shifted, g.const(1.0, np.float32), g.const(255.0, np.float32)),
              to=onnx.TensorProto.UINT8)  # [M, B, 64]: int8 codes + 128
    n = g.op("Slice", g.op("Shape", "w"), g.const([0]), g.const([1]))
    wb = g.op("Reshape", "w", g.op("Concat", n, g.const([-1, BLOCK]), axis=0))  # [N, B, 64]
    acc = g.op("MatMulInteger", g.op("Transpose", qx, perm=[1, 0, 2]), g.op("Transpose", wb, perm=[1, 2, 0]),
               g.const(128, np.uint8))  # [B, M, N] int32
    parts = g.op("Mul", g.op("Cast", acc, to=onnx.TensorProto.FLOAT), g.op("Transpose", x_scale, perm=[1, 0, 2]))
    w_scale = g.op("Unsqueeze", g.op("Transpose", "w_scale", perm=[1, 0]), g.const([1]))  # [B, 1, N]
    g.nodes.append(helper.make_node("ReduceSum", [g.op("Mul", parts, w_scale), g.const([0])], ["y"],
                                    keepdims=0, name="i8_y"))  # [M, N]
    return helper.make_function(DOMAIN, OP_TYPE, ["x", "w", "w_scale"], ["y"], g.nodes,
                                opset_imports=[helper.make_opsetid("", OPSET)])


def int8_linear(g: GraphBuilder, x: str, name: str, weight, two_level: bool = False) -> str:
    """Add an llmc.Int8Linear node over weight [N, K]: float32 (quantized here), or a QuantizedWeight (its
    int4 codes exactly where exact_codes can, else its dequantized weight quantized here).

    two_level: the activations' rounding error is quantized too and multiplied in the same op, as extra
    rows (y = W q(x) + W q(x - q(x))): activation error ~250x smaller, about weight-only int8, for twice the
    tile work but the same weight reads. For the LM head, which sees a few rows a step (measured on SmolLM2:
    one level cost +0.13% perplexity there).
    """
    if isinstance(weight, np.ndarray):
        codes, scale = quantize_weight(weight)
    else:
        codes, scale = exact_codes(weight) or quantize_weight(weight.dequantize())
    w, w_scale = g.weight(f"{name}.qweight_int8", codes), g.weight(f"{name}.scale_int8", scale)
    if not two_level:
        return g.op(OP_TYPE, x, w, w_scale, domain=DOMAIN, name=f"{name}.int8_linear")
    xb, rounded, x_scale = _block_codes(g, x)
    residual = g.op("Reshape", g.op("Sub", xb, g.op("Mul", rounded, x_scale)), g.op("Shape", x))  # [M, K]
    both = g.op(OP_TYPE, g.op("Concat", x, residual, axis=0), w, w_scale, domain=DOMAIN,
                name=f"{name}.int8_linear")  # [2M, N]
    first, second = g.op("Split", both, axis=0, outputs=2, num_outputs=2)  # [M, N] each
    return g.op("Add", first, second)
