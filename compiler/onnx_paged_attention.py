"""The `llmc.PagedAttention` op: an ONNX local function with a decomposed, Gather-based body.

onnxruntime (any EP) runs the body; a TensorRT build can map the node to a plugin instead.
Contract (all shapes dynamic):
    q [T, H, D], k_new/v_new [T, KVH, D] (already rotated), k_pool/v_pool [KVH, NB, B, D],
    block_tables int32 [S, M], context_lens int32 [S], query_start int32 [S+1],
    positions int64 [T]  ->  out [T, H*D];  attribute `scale` (float).
The pools are only read (the new tokens' K/V come in as k_new/v_new, and the runtime writes
them into its pools after the step). Tokens of a sequence sit at positions
context_len - q_len ... context_len - 1, in order.
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
    """The function body; see the module docstring for the contract.

    Attention runs in two parts that share one softmax: the cached keys gathered from the pool
    (positions < context_len - q_len) and the step's own new keys (causal among themselves), so
    the gathered context is never copied to insert the new tokens.
    """
    g = GraphBuilder("pa_")
    zero, one = g.const(0), g.const(1)
    scale = g.ref_attr_const("scale", onnx.AttributeProto.FLOAT)
    i64 = onnx.TensorProto.INT64

    # [STEP 1] per-sequence query ranges, the sequence of each token, cached lengths.
    qstart = g.op("Cast", "query_start", to=i64)  # [S+1]
    q_begin = g.op("Slice", qstart, g.const([0]), g.const([-1]))  # [S]
    q_end = g.op("Slice", qstart, g.const([1]), g.const([np.iinfo(np.int64).max]))  # [S]
    q_len = g.op("Sub", q_end, q_begin)  # [S]
    num_cached = g.op("Sub", g.op("Cast", "context_lens", to=i64), q_len)  # [S]
    q_max = g.op("ReduceMax", q_len, keepdims=0)  # scalar Qmax
    num_tokens = g.op("Squeeze", _dim(g, "q", 0))  # scalar T
    t_range = g.op("Range", zero, num_tokens, one)  # [T]
    after_end = g.op("GreaterOrEqual", g.op("Unsqueeze", t_range, one), g.op("Unsqueeze", q_end, zero))  # [T, S]
    seq_of_token = g.op("ReduceSum", g.op("Cast", after_end, to=i64), g.const([1]), keepdims=0)  # [T]

    # [STEP 2] queries and new K/V padded per sequence: [S, Qmax, ...].
    num_kv_heads, head_dim = _dim(g, "k_new", 1), _dim(g, "k_new", 2)
    q_range = g.op("Range", zero, q_max, one)  # [Qmax]
    q_idx = g.op("Min", g.op("Add", g.op("Unsqueeze", q_begin, one), g.op("Unsqueeze", q_range, zero)),
                 g.op("Sub", num_tokens, one))  # [S, Qmax]
    q5_shape = g.op("Concat", g.const([0, 0]), num_kv_heads, g.const([-1]), head_dim, axis=0)
    q5 = g.op("Transpose", g.op("Reshape", g.op("Gather", "q", q_idx, axis=0), q5_shape),
              perm=[2, 0, 3, 1, 4])  # [KVH, S, G, Qmax, D]
    q4 = g.op("Reshape", q5, g.op("Concat", g.const([0, 0, -1]), head_dim, axis=0))  # [KVH, S, GQ, D]
    # row r of GQ = (group r // Qmax, query r % Qmax)
    k_new = g.op("Transpose", g.op("Gather", "k_new", q_idx, axis=0), perm=[2, 0, 1, 3])  # [KVH, S, Qmax, D]
    v_new = g.op("Transpose", g.op("Gather", "v_new", q_idx, axis=0), perm=[2, 0, 1, 3])

    # [STEP 3] cached K/V: only the blocks holding cached tokens (none for a fresh prefill).
    # The head-major pool makes the gathered blocks [KVH, S, Mc, B, D]: a reshape, not a copy, away.
    block_size = _dim(g, "k_pool", 2)  # [1]
    max_cached = g.op("ReduceMax", num_cached, keepdims=1)  # [1]
    num_cached_blocks = g.op("Div", g.op("Sub", g.op("Add", max_cached, block_size), one), block_size)  # [1]
    tables = g.op("Slice", "block_tables", g.const([0]), num_cached_blocks, g.const([1]))  # [S, Mc]
    ctx_len = g.op("Mul", num_cached_blocks, block_size)  # [1] L = Mc * B
    ctx_shape = g.op("Concat", num_kv_heads, _dim(g, "block_tables", 0), ctx_len, head_dim, axis=0)
    k_ctx, v_ctx = (g.op("Reshape", g.op("Gather", pool, tables, axis=1), ctx_shape)
                    for pool in ("k_pool", "v_pool"))  # [KVH, S, L, D]

    # [STEP 4] scores of both parts plus additive masks, one softmax over their concatenation.
    neg_inf, no_bias = g.const(-np.inf, dtype=np.float32), g.const(0.0, dtype=np.float32)
    q4 = g.op("Mul", q4, scale)
    scores_c = g.op("MatMul", q4, g.op("Transpose", k_ctx, perm=[0, 1, 3, 2]))  # [KVH, S, GQ, L]
    scores_n = g.op("MatMul", q4, g.op("Transpose", k_new, perm=[0, 1, 3, 2]))  # [KVH, S, GQ, Qmax]
    key_c = g.op("Range", zero, g.op("Squeeze", ctx_len), one)  # [L]
    mask_c = g.op("Unsqueeze", g.op("Less", key_c, g.op("Unsqueeze", num_cached, one)), g.const([0, 2]))  # [1,S,1,L]
    group = g.op("Div", _dim(g, "q", 1), num_kv_heads)  # [1] G
    row_query = g.op("Tile", q_range, group)  # [GQ]: the query index of each row
    causal_n = g.op("LessOrEqual", q_range, g.op("Unsqueeze", row_query, one))  # [GQ, Qmax]
    valid_n = g.op("Less", q_range, g.op("Unsqueeze", q_len, one))  # [S, Qmax]
    mask_n = g.op("Unsqueeze", g.op("And", causal_n, g.op("Unsqueeze", valid_n, one)), zero)  # [1, S, GQ, Qmax]
    scores = g.op("Concat", g.op("Add", scores_c, g.op("Where", mask_c, no_bias, neg_inf)),
                  g.op("Add", scores_n, g.op("Where", mask_n, no_bias, neg_inf)), axis=-1)
    probs_c, probs_n = g.op("Split", g.op("Softmax", scores, axis=-1),
                            g.op("Concat", ctx_len, g.op("Unsqueeze", q_max, zero), axis=0), axis=-1, outputs=2)
    out = g.op("Add", g.op("MatMul", probs_c, v_ctx), g.op("MatMul", probs_n, v_new))  # [KVH, S, GQ, D]

    # [STEP 5] back to [T, H*D] in the flattened token order.
    out5_shape = g.op("Concat", g.const([0, 0]), group, g.op("Unsqueeze", q_max, zero), head_dim, axis=0)
    out = g.op("Transpose", g.op("Reshape", out, out5_shape), perm=[1, 3, 0, 2, 4])  # [S, Qmax, KVH, G, D]
    out = g.op("Reshape", out, g.const([0, 0, -1]))  # [S, Qmax, H*D]
    local = g.op("Sub", t_range, g.op("Gather", q_begin, seq_of_token, axis=0))  # [T]
    out_idx = g.op("Concat", g.op("Unsqueeze", seq_of_token, one), g.op("Unsqueeze", local, one), axis=1)
    g.nodes.append(helper.make_node("GatherND", [out, out_idx], ["out"], name="pa_GatherND_out"))
    return helper.make_function(
        DOMAIN, OP_TYPE, INPUTS, ["out"], g.nodes,
        opset_imports=[helper.make_opsetid("", 21)], attributes=["scale"])
