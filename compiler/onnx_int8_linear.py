"""llmc.Int8Linear: a linear layer with int8 weights and int8 activations (one scale per token), its
few outlier input channels in bf16.

    y[M, N] = (q_x[M, Ki] . q_w[N, Ki]^T) * x_scale[M] * w_scale[N] + bf16(x_o[M, Ko]) . w_o[N, Ko]^T
    x_p = x[:, channels]:  x_i = x_p[:, :Ki] (inliers), x_o = x_p[:, Ki:] (outliers)
    x_scale[m] = max|x_i[m]| / 127 (1 for an all-zero row), q_x = round(x_i / x_scale) in [-127, 127]

One scale per token keeps each token's result independent of the other tokens of the step, and lets
the int8 products sum over all of K in the CPU's int32 tiles. An activation scale per token alone lost
3.9% perplexity on SmolLM2: a few input channels carry activations up to ~700x the others' (the
calibration finds them: passes/act_outliers.py), and with them out of the int8 range (Ko = 128
channels by default, in bf16) the int8 graph costs ~0.2%. Weights are int8 per output channel; the
outlier channels' weights bf16. The op's ONNX function body computes it with the standard MatMulInteger
(activations as uint8 with zero point 128); llmc's CPU kernel library runs it on AMX int8 and bf16
tiles where the CPU has them (kernels/cpu/int8_linear.cc). Ki must be a multiple of 64 and Ko of 32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder

DOMAIN = "llmc"
OP_TYPE = "Int8Linear"
# the same over silu(gate) * up of an input [M, 2K] = gate | up (MLPs whose I is not a multiple of GLU_ALIGN)
SWIGLU_OP_TYPE = "Int8LinearSwiGLU"
GLU_OP_TYPE = "Int8LinearGLU"  # silu(gate) * up of the op's output [M, 2I] = gate | up: y [M, I]
GLU_ALIGN = 16  # Int8LinearGLU's I: whole tiles of gate and of up columns
SPLIT3_OP_TYPE = "Int8LinearSplit3"  # the same with y as 3 outputs side by side (input `splits`: widths)
OUTPUT_ALIGN = 16  # Int8LinearSplit3's widths: whole tiles of columns
OPSET = 23
INLIER_ALIGN = 64   # Ki: whole int8 tiles of K
OUTLIER_ALIGN = 32  # Ko: whole bf16 tiles of K
FORMAT = "per-token+outliers"  # recorded in the manifest: int8 graphs of other formats must be rebuilt


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return rounded.view(np.float32)


def channel_order(num_channels: int, outliers) -> np.ndarray:
    """The op's channel order: the inliers, then the outliers, each ascending; int64 [K]."""
    outliers = np.sort(np.asarray(outliers, dtype=np.int64))
    inliers = np.setdiff1d(np.arange(num_channels, dtype=np.int64), outliers)
    return np.concatenate([inliers, outliers])


def quantize_weight(w: np.ndarray, channels: np.ndarray, num_outliers: int):
    """(int8 codes [N, Ki], scales float32 [N], outlier weights as bf16 values in float32 [N, Ko])."""
    ki = w.shape[1] - num_outliers
    inlier, outlier = w[:, channels[:ki]], w[:, channels[ki:]]
    amax = np.abs(inlier).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # [N]
    codes = np.clip(np.rint(inlier / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes), scale, bf16_round(outlier)


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up of [M, 2K] = gate | up; [M, K]."""
    gate, up = np.split(gate_up, 2, axis=1)
    return gate / (1.0 + np.exp(-gate)) * up


def reference(x: np.ndarray, codes: np.ndarray, w_scale: np.ndarray, w_outlier: np.ndarray,
              channels: np.ndarray) -> np.ndarray:
    """The op in numpy (the tests' reference; Int8LinearSwiGLU's is this of swiglu(x))."""
    ki = codes.shape[1]
    xp = x[:, channels]
    inlier, outlier = xp[:, :ki], xp[:, ki:]
    amax = np.abs(inlier).max(axis=1, keepdims=True)
    x_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # [M, 1]
    qx = np.rint(inlier / x_scale).astype(np.int64)
    sums = (qx @ codes.astype(np.int64).T).astype(np.float32)  # [M, N]
    return sums * x_scale * w_scale[None] + bf16_round(outlier) @ w_outlier.T


def _row_codes(g: GraphBuilder, x: str) -> tuple[str, str]:
    """x [M, Ki]: (its rounded codes as float [M, Ki], its scales [M, 1])."""
    amax = g.op("ReduceMax", g.op("Abs", x), g.const([1]), keepdims=1)  # [M, 1]
    positive = g.op("Greater", amax, g.const(0.0, np.float32))
    x_scale = g.op("Where", positive, g.op("Div", amax, g.const(127.0, np.float32)), g.const(1.0, np.float32))
    return g.op("Round", g.op("Div", x, x_scale)), x_scale


def build_function(op_type: str = OP_TYPE) -> onnx.FunctionProto:
    """The portable body of op_type: (x, w, w_scale, w_outlier, channels) -> y, Split3's (..., splits) -> y0, y1, y2."""
    g = GraphBuilder("i8_")
    x = "x"
    if op_type == SWIGLU_OP_TYPE:  # x [M, 2K] = gate | up
        k = g.op("Shape", "channels")  # [1]
        gate = g.op("Slice", x, g.const([0]), k, g.const([1]))
        x = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), g.op("Slice", x, k, g.const([1 << 62]), g.const([1])))
    ki = g.op("Slice", g.op("Shape", "w"), g.const([1]), g.const([2]))  # [1]
    xp = g.op("Gather", x, "channels", axis=1)  # [M, K]
    inlier = g.op("Slice", xp, g.const([0]), ki, g.const([1]))  # [M, Ki]
    outlier = g.op("Slice", xp, ki, g.const([1 << 62]), g.const([1]))  # [M, Ko]
    codes, x_scale = _row_codes(g, inlier)
    shifted = g.op("Add", codes, g.const(128.0, np.float32))
    qx = g.op("Cast", g.op("Clip", shifted, g.const(1.0, np.float32), g.const(255.0, np.float32)),
              to=onnx.TensorProto.UINT8)  # [M, Ki]: int8 codes + 128
    sums = g.op("MatMulInteger", qx, g.op("Transpose", "w", perm=[1, 0]), g.const(128, np.uint8))  # [M, N]
    scaled = g.op("Mul", g.op("Mul", g.op("Cast", sums, to=onnx.TensorProto.FLOAT), x_scale), "w_scale")
    outlier_bf16 = g.op("Cast", g.op("Cast", outlier, to=onnx.TensorProto.BFLOAT16), to=onnx.TensorProto.FLOAT)
    outlier_sums = g.op("MatMul", outlier_bf16, g.op("Transpose", "w_outlier", perm=[1, 0]))  # [M, N]
    inputs, outputs = ["x", "w", "w_scale", "w_outlier", "channels"], ["y"]
    if op_type == SPLIT3_OP_TYPE:
        inputs, outputs = inputs + ["splits"], ["y0", "y1", "y2"]
        g.nodes.append(helper.make_node("Split", [g.op("Add", scaled, outlier_sums), "splits"], outputs, axis=1,
                                        name="i8_split"))
    elif op_type == GLU_OP_TYPE:
        gate, up = g.op("Split", g.op("Add", scaled, outlier_sums), num_outputs=2, axis=1, outputs=2)
        g.nodes.append(helper.make_node("Mul", [g.op("Mul", gate, g.op("Sigmoid", gate)), up], ["y"], name="i8_y"))
    else:
        g.nodes.append(helper.make_node("Add", [scaled, outlier_sums], ["y"], name="i8_y"))
    return helper.make_function(DOMAIN, op_type, inputs, outputs, g.nodes,
                                opset_imports=[helper.make_opsetid("", OPSET)])


FUNCTIONS = (OP_TYPE, SWIGLU_OP_TYPE, SPLIT3_OP_TYPE, GLU_OP_TYPE)  # what an int8 graph may use: build_function of each


def supports(in_features: int, num_outliers: int) -> bool:
    """Whether a linear of in_features can take the op with num_outliers outlier channels."""
    return num_outliers % OUTLIER_ALIGN == 0 and (in_features - num_outliers) % INLIER_ALIGN == 0 \
        and in_features > num_outliers


def int8_linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, outliers, swiglu: bool = False,
                splits: list[int] | None = None, glu: bool = False):
    """Add an llmc.Int8Linear node over a float weight [N, K] (a quantized weight dequantized first) with
    the given outlier input channels (see passes/act_outliers.py). swiglu: an Int8LinearSwiGLU node,
    whose x [M, 2K] is gate | up. splits (3 widths, multiples of 16): an Int8LinearSplit3 node over
    stacked weights, returning its 3 outputs (one quantization of x for the 3 linears). glu: an
    Int8LinearGLU node over a weight [2I, K] = gate | up (I a multiple of 16), returning silu(gate) * up [M, I].
    """
    if not supports(weight.shape[1], len(outliers)):
        raise ValueError(f"{name}: Int8Linear takes {len(outliers)} outlier channels (a multiple of {OUTLIER_ALIGN}) "
                         f"of {weight.shape[1]} only if the others are a multiple of {INLIER_ALIGN}")
    channels = channel_order(weight.shape[1], outliers)
    codes, scale, w_outlier = quantize_weight(weight, channels, len(outliers))
    w, w_scale = g.weight(f"{name}.qweight_int8", codes), g.weight(f"{name}.scale_int8", scale)
    w_o, order = g.weight(f"{name}.outlier_bf16", w_outlier), g.weight(f"{name}.channels", channels)
    if splits is not None:
        return g.op(SPLIT3_OP_TYPE, x, w, w_scale, w_o, order, g.const(splits), domain=DOMAIN, outputs=3,
                    name=f"{name}.int8_linear")
    op_type = GLU_OP_TYPE if glu else SWIGLU_OP_TYPE if swiglu else OP_TYPE
    return g.op(op_type, x, w, w_scale, w_o, order, domain=DOMAIN,
                name=f"{name}.int8_linear")
