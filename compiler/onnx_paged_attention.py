"""The `llmc.PagedAttention` op: an ONNX local function with a decomposed, Gather-based body.

onnxruntime (any EP) runs the body; a TensorRT build can map the node to a plugin instead.
Contract (all shapes dynamic):
    q [T, H, D], k_new/v_new [T, KVH, D] (already rotated), k_pool/v_pool [NB, B, KVH, D],
    block_tables int32 [S, M], context_lens int32 [S], query_start int32 [S+1],
    positions int64 [T]  ->  out [T, H*D];  attribute `scale` (float).
The new tokens' K/V are overlaid at their positions on the gathered context, so the pools are
only read: the runtime writes the returned K/V into its pools after the step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder

DOMAIN = "llmc"
OP_TYPE = "PagedAttention"
INPUTS = ["q", "k_new", "v_new", "k_pool", "v_pool", "block_tables", "context_lens", "query_start", "positions"]


def _dim(g: GraphBuilder, tensor: str, axis: int) -> str:
    return g.op("Shape", tensor, start=axis, end=axis + 1)  # [1]


def build_function() -> onnx.FunctionProto:
    """The function body; see the module docstring for the contract."""
    g = GraphBuilder("pa_")
    zero, one = g.const(0), g.const(1)
    scale = g.ref_attr_const("scale", onnx.AttributeProto.FLOAT)

    # [STEP 1] per-sequence query ranges and the sequence of each token.
    qstart = g.op("Cast", "query_start", to=onnx.TensorProto.INT64)  # [S+1]
    q_begin = g.op("Slice", qstart, g.const([0]), g.const([-1]))  # [S]
    q_end = g.op("Slice", qstart, g.const([1]), g.const([np.iinfo(np.int64).max]))  # [S]
    q_len = g.op("Sub", q_end, q_begin)
    q_max = g.op("ReduceMax", q_len, keepdims=0)  # scalar
    num_tokens = g.op("Squeeze", _dim(g, "q", 0))  # scalar T
    t_range = g.op("Range", zero, num_tokens, one)  # [T]
    after_end = g.op("GreaterOrEqual", g.op("Unsqueeze", t_range, one), g.op("Unsqueeze", q_end, zero))  # [T, S]
    seq_of_token = g.op("ReduceSum", g.op("Cast", after_end, to=onnx.TensorProto.INT64), g.const([1]),
                        keepdims=0)  # [T]

    # [STEP 2] gather each sequence's blocks and overlay the new tokens' K/V.
    num_kv_heads, head_dim = _dim(g, "k_new", 1), _dim(g, "k_new", 2)
    num_seqs = _dim(g, "block_tables", 0)
    ctx_shape = g.op("Concat", num_seqs, g.const([-1]), num_kv_heads, head_dim, axis=0)
    scatter_idx = g.op("Concat", g.op("Unsqueeze", seq_of_token, one), g.op("Unsqueeze", "positions", one),
                       axis=1)  # [T, 2]
    contexts = []
    for pool, new in (("k_pool", "k_new"), ("v_pool", "v_new")):
        ctx = g.op("Reshape", g.op("Gather", pool, "block_tables", axis=0), ctx_shape)  # [S, L, KVH, D]
        contexts.append(g.op("ScatterND", ctx, scatter_idx, new))
    k_ctx, v_ctx = contexts

    # [STEP 3] pad queries to [S, Qmax] and compute grouped-query attention per sequence.
    q_idx = g.op("Add", g.op("Unsqueeze", q_begin, one),
                 g.op("Unsqueeze", g.op("Range", zero, q_max, one), zero))  # [S, Qmax]
    q_idx = g.op("Min", q_idx, g.op("Sub", num_tokens, one))
    q_pad = g.op("Gather", "q", q_idx, axis=0)  # [S, Qmax, H, D]
    pos_pad = g.op("Gather", "positions", q_idx, axis=0)  # [S, Qmax]
    q5_shape = g.op("Concat", g.const([0, 0]), num_kv_heads, g.const([-1]), head_dim, axis=0)
    q5 = g.op("Transpose", g.op("Reshape", q_pad, q5_shape), perm=[0, 2, 3, 1, 4])  # [S, KVH, G, Qmax, D]
    k5 = g.op("Unsqueeze", g.op("Transpose", k_ctx, perm=[0, 2, 3, 1]), g.const([2]))  # [S, KVH, 1, D, L]
    v5 = g.op("Unsqueeze", g.op("Transpose", v_ctx, perm=[0, 2, 1, 3]), g.const([2]))  # [S, KVH, 1, L, D]
    scores = g.op("Mul", g.op("MatMul", q5, k5), scale)  # [S, KVH, G, Qmax, L]
    key_pos = g.op("Range", zero, g.op("Squeeze", _dim(g, k_ctx, 1)), one)  # [L]
    ctx_lens = g.op("Cast", "context_lens", to=onnx.TensorProto.INT64)  # [S]
    causal = g.op("LessOrEqual", key_pos, g.op("Unsqueeze", pos_pad, g.const([2])))  # [S, Qmax, L]
    in_ctx = g.op("Less", key_pos, g.op("Unsqueeze", ctx_lens, g.const([1, 2])))  # [S, 1, L]
    allowed = g.op("Unsqueeze", g.op("And", causal, in_ctx), g.const([1, 2]))  # [S, 1, 1, Qmax, L]
    neg_inf = g.const(-np.inf, dtype=np.float32)
    probs = g.op("Softmax", g.op("Where", allowed, scores, neg_inf), axis=-1)
    out = g.op("Transpose", g.op("MatMul", probs, v5), perm=[0, 3, 1, 2, 4])  # [S, Qmax, KVH, G, D]
    out = g.op("Reshape", out, g.const([0, 0, -1]))  # [S, Qmax, H*D]

    # [STEP 4] back to the flattened token order.
    local = g.op("Sub", t_range, g.op("Gather", q_begin, seq_of_token, axis=0))  # [T]
    out_idx = g.op("Concat", g.op("Unsqueeze", seq_of_token, one), g.op("Unsqueeze", local, one), axis=1)
    g.nodes.append(helper.make_node("GatherND", [out, out_idx], ["out"], name="pa_GatherND_out"))
    return helper.make_function(
        DOMAIN, OP_TYPE, INPUTS, ["out"], g.nodes,
        opset_imports=[helper.make_opsetid("", 21)], attributes=["scale"])
