"""Paged attention in ONNX: a step plan computed once per step, and the `llmc.PagedAttention` op per layer.

The plan (`build_plan`, nodes in the main graph) turns the step contract's ragged layout into a
padded one that every layer shares: each sequence's queries padded to the longest chunk, its
cached blocks, its cached and new lengths. The op (`build_function`, an ONNX local function) is then
a handful of nodes around the standard ONNX `Attention` op (opset 23: grouped-query heads, the
cached keys, concatenated with the new ones, as its key input, an additive mask it builds from the
lengths). onnxruntime (any EP) runs the body; a TensorRT build can map the node to a plugin instead.
The mask lives in the body, not the plan: llmc's fused kernel needs none, and for a step mixing
64 decodes with a 500-token chunk the padded mask was ~160 MB, ~5% of the step to build.

The pools are token-major ([NB, B, KVH, D]): a gather of a sequence's blocks is already its keys
[L, KVH * D], the 3-D layout onnxruntime's Attention kernel reads in place (strided), so each layer
copies its cached K/V once (gather) and once more (concatenation with the step's tokens).

Op contract (S sequences, T tokens, Qmax the longest chunk, L = cached blocks * block_size):
    q [T, H*D], k [T, KVH*D], v [T, KVH*D]          the step's projections, before RoPE
    k_pool, v_pool [NB, B, KVH, D]                  the layer's pools, read only (float32, float16 or int8)
    query_index int64 [S, Qmax]                     token of each padded query (plan)
    query_positions int64 [S, Qmax]                 its position (plan)
    cached_tables [S, Mc]                           blocks holding cached tokens (plan)
    cached_shape int64 [3] = [S, L, KVH*D]          (plan)
    lengths int64 [S, 2]                            (cached tokens, new tokens) of each sequence (plan)
    token_index int64 [T, 2]                        (sequence, row) of each token in the padded layout (plan)
    rope_cos, rope_sin [P, D/2]
    k_scale, v_scale [KVH*D]                        int8 pools only: a pool value is code * its channel's scale
    -> out [T, H*D], k_rotated [T, KVH*D] (the keys to write into the pool)
    attributes: scale (float), num_heads, kv_num_heads (int), and optionally bf16_tiles (int): llmc's
    kernel may run prefill tiles on AMX bf16 tiles (bf16 Q, K, V and probabilities, float sums); the
    body ignores it (float32 throughout)
The new tokens' K/V come in as k/v; the runtime writes them into its pools after the step.
Tokens of a sequence sit at positions context_len - q_len ... context_len - 1, in order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from llmc.compiler.onnx_builder import GraphBuilder

DOMAIN = "llmc"
OP_TYPE = "PagedAttention"
OPSET = 23
PLAN = ["query_index", "query_positions", "cached_tables", "cached_shape", "lengths", "token_index"]
PLAN_FORMAT = "lengths"  # recorded in the manifest: bundles whose plan passed a mask must be rebuilt
INPUTS = ["q", "k", "v", "k_pool", "v_pool", *PLAN, "rope_cos", "rope_sin"]
SCALES = ["k_scale", "v_scale"]  # after INPUTS, with int8 pools
POOL_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}


def inputs(kv_dtype: str) -> list[str]:
    """The op's inputs for pools of kv_dtype."""
    return INPUTS + SCALES if kv_dtype == "int8" else INPUTS


def build_plan(g: GraphBuilder, num_kv_heads: int, head_dim: int, pool: str) -> dict[str, str]:
    """Add the per-step plan nodes (reading the graph inputs positions, query_start, context_lens,
    block_tables and the pool's block size); returns the names of the PLAN tensors."""
    zero, one = g.const(0), g.const(1)
    i64 = onnx.TensorProto.INT64
    # Ragged layout: query ranges, cached lengths, the sequence of each token.
    qstart = g.op("Cast", "query_start", to=i64)  # [S+1]
    q_begin = g.op("Slice", qstart, g.const([0]), g.const([-1]))  # [S]
    q_end = g.op("Slice", qstart, g.const([1]), g.const([np.iinfo(np.int64).max]))  # [S]
    q_len = g.op("Sub", q_end, q_begin)  # [S]
    num_cached = g.op("Sub", g.op("Cast", "context_lens", to=i64), q_len)  # [S]
    q_max = g.op("ReduceMax", q_len, keepdims=0)  # scalar Qmax
    num_tokens = g.op("Squeeze", g.op("Shape", "positions"))  # scalar T
    t_range = g.op("Range", zero, num_tokens, one)  # [T]
    after_end = g.op("GreaterOrEqual", g.op("Unsqueeze", t_range, one), g.op("Unsqueeze", q_end, zero))  # [T, S]
    seq_of_token = g.op("ReduceSum", g.op("Cast", after_end, to=i64), g.const([1]), keepdims=0)  # [T]
    row_of_token = g.op("Sub", t_range, g.op("Gather", q_begin, seq_of_token, axis=0))  # [T]
    token_index = g.op("Concat", g.op("Unsqueeze", seq_of_token, one), g.op("Unsqueeze", row_of_token, one), axis=1)

    # Padded queries: row r of sequence s is token q_begin[s] + r (clamped; masked rows are padding).
    q_range = g.op("Range", zero, q_max, one)  # [Qmax]
    query_index = g.op("Min", g.op("Add", g.op("Unsqueeze", q_begin, one), g.op("Unsqueeze", q_range, zero)),
                       g.op("Sub", num_tokens, one))  # [S, Qmax]
    query_positions = g.op("Gather", "positions", query_index, axis=0)  # [S, Qmax]

    # Cached blocks: at least one (a zero-length past is not worth a special case; it is masked out).
    block_size = g.op("Shape", pool, start=1, end=2)  # [1]
    max_cached = g.op("ReduceMax", num_cached, keepdims=1)  # [1]
    num_blocks = g.op("Max", g.op("Div", g.op("Sub", g.op("Add", max_cached, block_size), one), block_size), one)
    cached_tables = g.op("Slice", "block_tables", g.const([0]), num_blocks, g.const([1]))  # [S, Mc]
    ctx_len = g.op("Mul", num_blocks, block_size)  # [1] L
    cached_shape = g.op("Concat", g.op("Shape", "block_tables", start=0, end=1), ctx_len,
                        g.const([num_kv_heads * head_dim]), axis=0)

    lengths = g.op("Concat", g.op("Unsqueeze", num_cached, one), g.op("Unsqueeze", q_len, one), axis=1)  # [S, 2]
    return dict(zip(PLAN, (query_index, query_positions, cached_tables, cached_shape, lengths, token_index)))


def _mask(g: GraphBuilder) -> str:
    """The body's additive mask [S, 1, Qmax, L + Qmax] from the plan: cached key j < num_cached; new key
    j <= the query's row and j < q_len."""
    zero, one = g.const(0), g.const(1)
    num_cached = g.op("Slice", "lengths", g.const([0]), g.const([1]), g.const([1]))  # [S, 1]
    q_len = g.op("Slice", "lengths", g.const([1]), g.const([2]), g.const([1]))  # [S, 1]
    q_max = g.op("Shape", "query_index", start=1, end=2)  # [1]
    ctx_len = g.op("Slice", "cached_shape", g.const([1]), g.const([2]))  # [1] L
    key_c = g.op("Range", zero, g.op("Squeeze", ctx_len), one)  # [L]
    q_range = g.op("Range", zero, g.op("Squeeze", q_max), one)  # [Qmax]
    allowed_c = g.op("Less", key_c, num_cached)  # [S, L]
    causal = g.op("LessOrEqual", q_range, g.op("Unsqueeze", q_range, one))  # [Qmax, Qmax]
    valid_n = g.op("Less", q_range, q_len)  # [S, Qmax]
    allowed_n = g.op("And", g.op("Unsqueeze", causal, zero), g.op("Unsqueeze", valid_n, one))  # [S, Qmax, Qmax]
    rows = g.op("Concat", q_max, ctx_len, axis=0)  # [2] = [Qmax, L]
    allowed = g.op("Concat", g.op("Expand", g.op("Unsqueeze", allowed_c, one), rows), allowed_n, axis=-1)
    return g.op("Unsqueeze", g.op("Where", allowed, g.const(0.0, np.float32), g.const(-np.inf, np.float32)),
                one)  # [S, 1, Qmax, L + Qmax]


def build_function(kv_dtype: str = "float32") -> onnx.FunctionProto:
    """The op's body; see the module docstring for the contract. float16 and int8 pools are read as float32."""
    g = GraphBuilder("pa_")
    integer, real = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT
    q, k, v = (g.op("Gather", name, "query_index", axis=0) for name in ("q", "k", "v"))  # [S, Qmax, heads*D]
    rope_inputs = ("rope_cos", "rope_sin", "query_positions")
    q = g.op("RotaryEmbedding", q, *rope_inputs, interleaved=0, refs={"num_heads": ("num_heads", integer)})
    k = g.op("RotaryEmbedding", k, *rope_inputs, interleaved=0, refs={"num_heads": ("kv_num_heads", integer)})
    # Cached then new keys [S, L + Qmax, KVH*D]: no past_key input, so no present copy inside Attention.
    cached = [g.op("Reshape", g.op("Gather", pool, "cached_tables", axis=0), "cached_shape")
              for pool in ("k_pool", "v_pool")]  # [S, L, KVH*D] each
    if kv_dtype == "float16":
        cached = [g.op("Cast", c, to=onnx.TensorProto.FLOAT) for c in cached]
    elif kv_dtype == "int8":
        cached = [g.op("DequantizeLinear", c, scale, axis=2) for c, scale in zip(cached, SCALES)]
    k_all, v_all = (g.op("Concat", c, new, axis=1) for c, new in zip(cached, (k, v)))
    out = g.op("Attention", q, k_all, v_all, _mask(g), refs={
        "scale": ("scale", real), "q_num_heads": ("num_heads", integer), "kv_num_heads": ("kv_num_heads", integer)})
    g.nodes.append(helper.make_node("GatherND", [out, "token_index"], ["out"], name="pa_out"))  # [T, H*D]
    g.nodes.append(helper.make_node("GatherND", [k, "token_index"], ["k_rotated"], name="pa_k_rotated"))
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs(kv_dtype), ["out", "k_rotated"], g.nodes,
        opset_imports=[helper.make_opsetid("", OPSET)], attributes=["scale", "num_heads", "kv_num_heads", "bf16_tiles"])


def build_single_op_model(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, pool_dims: list,
                          positions: int, bf16_tiles: bool = False) -> onnx.ModelProto:
    """One llmc.PagedAttention node over graph inputs (the step contract's q, k, v, pools, positions,
    block_tables, context_lens, query_start, RoPE tables, and with int8 pools k_scale / v_scale), with
    the engine graphs' step plan: for kernel tests and benchmarks. pool_dims: [NB, B, KVH, D]."""
    g = GraphBuilder("t_")
    plan = build_plan(g, kv_heads, head_dim, "k_pool")
    extra = {"bf16_tiles": 1} if bf16_tiles else {}
    node_inputs = [plan.get(name, name) for name in inputs(kv_dtype)]  # the plan's tensors, else graph inputs
    g.nodes.append(helper.make_node(OP_TYPE, node_inputs, ["out", "k_rotated"], domain=DOMAIN,
                                    scale=float(head_dim ** -0.5), num_heads=heads, kv_num_heads=kv_heads, **extra))
    f32, i32, i64, pool_type = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                POOL_TYPES[kv_dtype])
    value = helper.make_tensor_value_info
    graph_inputs = [value("q", f32, ["T", heads * head_dim]), value("k", f32, ["T", kv_heads * head_dim]),
                    value("v", f32, ["T", kv_heads * head_dim]), value("k_pool", pool_type, pool_dims),
                    value("v_pool", pool_type, pool_dims), value("positions", i64, ["T"]),
                    value("block_tables", i32, ["S", "M"]), value("context_lens", i32, ["S"]),
                    value("query_start", i32, ["S1"]), value("rope_cos", f32, [positions, head_dim // 2]),
                    value("rope_sin", f32, [positions, head_dim // 2])]
    if kv_dtype == "int8":
        graph_inputs += [value(name, f32, [kv_heads * head_dim]) for name in SCALES]
    graph = helper.make_graph(g.nodes, "attention", graph_inputs, [value("out", f32, ["T", heads * head_dim])],
                              g.initializers)
    return helper.make_model(graph, functions=[build_function(kv_dtype)],
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
