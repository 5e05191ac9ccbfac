"""llmc.Int4Linear: a linear layer with int4 weights per group, the op of the int4 decode graph.

    W[n, k] = scale[n, g] * code[n, k] + offset[n, g],  g = k // group_size,
    offset = float16(-scale * zero)  (scale float16, zero uint8: symmetric weights have zero 8)
    y[M, N] = xd[M, K] . W^T,  xd = x quantized to int8 per block of 32 input channels and back:
    a = max |x_block| / 127 (1 for a block of zeros), xd = round(x / a) * a

What a batch-1 step streams per weight is what decides its speed on a CPU (every weight is read once a
token): 4 bits of code plus, per group of 128, a float16 scale and offset (0.53 bytes), where
com.microsoft.MatMulNBits keeps a float32 scale and a zero point per block of 32 activations (0.64 bytes
for the same group-128 weights). llmc's kernel (kernels/cpu/int4_linear.cc) runs it on AVX-512 VNNI; the
op's ONNX function body computes the same with standard ops. Int4LinearGLU returns silu(gate) * up of
the linear's output gate | up ([M, N / 2]): one node for the MLP's gate, up and activation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels.quant import QuantizedWeight

DOMAIN = "llmc"
OP_TYPE = "Int4Linear"
GLU_OP_TYPE = "Int4LinearGLU"
FUNCTIONS = (OP_TYPE, GLU_OP_TYPE)
GLU_ALIGN = 16  # Int4LinearGLU's outputs (gate's rows): whole tiles of gate and of up columns
OPSET = 23
ACTIVATION_BLOCK = 32  # input channels per activation scale; K and the group size are multiples of it
FORMAT = "int4 groups, float16 scale and offset; int8 activations per 32 channels"  # in the manifest


def supports(qw: QuantizedWeight) -> bool:
    """Whether a quantized weight can take the op: 4 bits, integer (or no) zero points, K and the group
    size whole activation blocks."""
    return (qw.bits == 4 and (qw.zero is None or qw.zero.dtype == np.uint8)
            and qw.in_features % ACTIVATION_BLOCK == 0 and qw.block_size % ACTIVATION_BLOCK == 0)


def op_inputs(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's weight inputs: codes uint8 [N, K / 2] (channel 2j in the low nibble of byte j), scale float16
    [N, groups], zero uint8 [N, groups]."""
    n, k = qw.q.shape[0], qw.in_features
    codes = qw.q.reshape(n, -1)[:, :k]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    zero = np.full(qw.scale.shape, 8, np.uint8) if qw.zero is None else qw.zero.astype(np.uint8)
    return np.ascontiguousarray(packed), qw.scale.astype(np.float16), np.ascontiguousarray(zero)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> np.ndarray:
    """W [N, K] as the op computes it from its inputs (float16 offsets included)."""
    q = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], -1).astype(np.float32)  # [N, K]
    s = scale.astype(np.float32)
    offset = (-s * zero.astype(np.float32)).astype(np.float16).astype(np.float32)  # [N, groups]
    groups = np.arange(q.shape[1]) // group_size
    return q * s[:, groups] + offset[:, groups]


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """x [M, K] through the op's int8 blocks of 32 channels and back."""
    blocks = x.reshape(x.shape[0], -1, ACTIVATION_BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    a = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    return (np.rint(blocks / a) * a).reshape(x.shape).astype(np.float32)


def reference(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int,
              glu: bool = False) -> np.ndarray:
    """The op in numpy (the tests' reference)."""
    y = quantize_activations(x).astype(np.float64) @ dequantize(codes, scale, zero, group_size).T.astype(np.float64)
    if glu:
        gate, up = np.split(y, 2, axis=1)
        y = gate / (1.0 + np.exp(-gate)) * up
    return y.astype(np.float32)


def build_function(op_type: str = OP_TYPE) -> onnx.FunctionProto:
    """The portable body of op_type: (x, w, scale, zero) -> y, attribute group_size."""
    g = GraphBuilder("i4_")
    f32 = onnx.TensorProto.FLOAT
    # activations: int8 codes per block of 32 channels, back to float
    blocks = g.op("Reshape", "x", g.const([0, -1, ACTIVATION_BLOCK]))  # [M, K / 32, 32]
    amax = g.op("ReduceMax", g.op("Abs", blocks), g.const([2]), keepdims=1)  # [M, K / 32, 1]
    a = g.op("Where", g.op("Greater", amax, g.const(0.0, np.float32)), g.op("Div", amax, g.const(127.0, np.float32)),
             g.const(1.0, np.float32))
    xd = g.op("Reshape", g.op("Mul", g.op("Round", g.op("Div", blocks, a)), a), g.op("Shape", "x"))  # [M, K]
    # weights: codes (low nibble first), scale and float16 offset per group, expanded over the group's channels
    low = g.op("Unsqueeze", g.op("BitwiseAnd", "w", g.const(15, np.uint8)), g.const([2]))
    high = g.op("Unsqueeze", g.op("BitShift", "w", g.const(4, np.uint8), direction="RIGHT"), g.const([2]))
    k = g.op("Slice", g.op("Shape", "x"), g.const([1]), g.const([2]))  # [1]
    q = g.op("Cast", g.op("Reshape", g.op("Concat", low, high, axis=2), g.op("Concat", g.const([-1]), k, axis=0)),
             to=f32)  # [N, K]
    group = g.op("Constant", refs={"value_int": ("group_size", onnx.AttributeProto.INT)})
    channels = g.op("Range", g.const(0), g.op("Squeeze", k), g.const(1))  # [K]
    groups = g.op("Div", channels, group)  # [K]: each channel's group
    scale = g.op("Cast", "scale", to=f32)  # [N, groups]
    offset = g.op("Cast", g.op("Cast", g.op("Neg", g.op("Mul", scale, g.op("Cast", "zero", to=f32))),
                               to=onnx.TensorProto.FLOAT16), to=f32)
    w = g.op("Add", g.op("Mul", q, g.op("Gather", scale, groups, axis=1)), g.op("Gather", offset, groups, axis=1))
    y = g.op("MatMul", xd, g.op("Transpose", w, perm=[1, 0]))  # [M, N]
    if op_type == GLU_OP_TYPE:
        gate, up = g.op("Split", y, num_outputs=2, axis=1, outputs=2)
        y = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    g.nodes.append(helper.make_node("Identity", [y], ["y"], name="i4_y"))
    return helper.make_function(DOMAIN, op_type, ["x", "w", "scale", "zero"], ["y"], g.nodes,
                                opset_imports=[helper.make_opsetid("", OPSET)], attributes=["group_size"])


def int4_linear(g: GraphBuilder, x: str, name: str, qw: QuantizedWeight, glu: bool = False) -> str:
    """Add an llmc.Int4Linear node (glu: Int4LinearGLU over a weight gate | up) and its weights."""
    if not supports(qw):
        raise ValueError(f"{name}: Int4Linear takes 4-bit weights with integer zero points whose K and group size "
                         f"are multiples of {ACTIVATION_BLOCK}")
    codes, scale, zero = op_inputs(qw)
    return g.op(GLU_OP_TYPE if glu else OP_TYPE, x, g.weight(f"{name}.qweight_int4", codes),
                g.weight(f"{name}.scale_fp16", scale), g.weight(f"{name}.zero_uint8", zero), domain=DOMAIN,
                name=f"{name}.int4_linear", group_size=qw.block_size)
