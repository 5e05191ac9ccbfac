"""The Triton kernel of the llmc.PagedAttention node (what a TensorRT plugin for it runs) against the node's ONNX
function body in onnxruntime, on the same inputs: RoPE inside, cached keys through the plan's tables, the step's
own keys causal, the rotated keys returned. Under TRITON_INTERPRET=1 on the CPU."""

import random

import numpy as np

from tests.helpers import session_options, triton_or_skip

torch, _, _ = triton_or_skip("the Triton kernels are")

import onnxruntime as ort  # noqa: E402

from llmc.compiler import onnx_paged_attention as pa  # noqa: E402
from llmc.kernels import reference as ref  # noqa: E402
from llmc.kernels.triton.node_attention import node_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS, POSITIONS = 4, 2, 32, 4, 40, 128


def _step(rng):
    """Three sequences (cached, new): a fresh prompt, a chunk after cached tokens, a decode."""
    shapes = [(0, 5), (9, 3), (13, 1)]
    ids = rng.permutation(NUM_BLOCKS)
    tables = np.zeros((3, 6), np.int32)
    at = 0
    for s, (cached, new) in enumerate(shapes):
        n = -(-(cached + new) // BLOCK)
        tables[s, :n] = ids[at:at + n]
        at += n
    context = np.array([c + n for c, n in shapes], np.int32)
    starts = np.concatenate([[0], np.cumsum([n for _, n in shapes])]).astype(np.int32)
    positions = np.concatenate([np.arange(c, c + n) for c, n in shapes]).astype(np.int64)
    return shapes, tables, context, starts, positions


def _plan(shapes, tables, starts, positions):
    """The node's plan tensors, as build_plan computes them in the graph."""
    q_max, num_tokens = max(n for _, n in shapes), len(positions)
    query_index = np.minimum(starts[:-1, None] + np.arange(q_max)[None, :], num_tokens - 1).astype(np.int64)
    cached_blocks = max(1, -(-max(c for c, _ in shapes) // BLOCK))
    lengths = np.array(shapes, np.int64)
    return query_index, positions[query_index], np.ascontiguousarray(tables[:, :cached_blocks]), lengths


def test_the_node_kernel_matches_the_onnx_function_body():
    seed = random.randrange(2**31)
    rng = np.random.default_rng(seed)
    shapes, tables, context, starts, positions = _step(rng)
    num_tokens = len(positions)
    q = rng.standard_normal((num_tokens, HEADS * HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((num_tokens, KV_HEADS * HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((num_tokens, KV_HEADS * HEAD_DIM), dtype=np.float32)
    pools = [rng.standard_normal((NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(2)]
    cos, sin = (t[:, :HEAD_DIM // 2].numpy() for t in ref.rope_tables(POSITIONS, HEAD_DIM, 10000.0))
    model = pa.build_single_op_model(HEADS, KV_HEADS, HEAD_DIM, "float32", list(pools[0].shape), POSITIONS)
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    expected = session.run(["out"], {"q": q, "k": k, "v": v, "k_pool": pools[0], "v_pool": pools[1],
                                     "positions": positions, "block_tables": tables, "context_lens": context,
                                     "query_start": starts, "rope_cos": cos, "rope_sin": sin})[0]
    query_index, query_positions, cached_tables, lengths = _plan(shapes, tables, starts, positions)
    out, k_rotated = node_attention(*(torch.from_numpy(a) for a in (q, k, v, *pools, query_index, query_positions,
                                                                   cached_tables, lengths, cos, sin)),
                                    HEAD_DIM ** -0.5, HEADS, KV_HEADS)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=1e-4, err_msg=f"seed {seed}")
    rotated = ref.apply_rope(torch.from_numpy(k).view(num_tokens, KV_HEADS, HEAD_DIM),
                             *(t[torch.from_numpy(positions)] for t in ref.rope_tables(POSITIONS, HEAD_DIM, 10000.0)))
    np.testing.assert_allclose(k_rotated.numpy(), rotated.reshape(num_tokens, -1).numpy(), atol=1e-5,
                               err_msg=f"seed {seed}")
