"""The `llmc.PagedAttention` ONNX node's semantics in one Triton kernel: what a TensorRT plugin for the node runs
(compiler/onnx_paged_attention.py states the contract). Unlike the CUDA engine's kernels, the node takes the
step's keys and values before RoPE and not yet in the pools: it rotates q and k itself, attends each query to its
sequence's cached keys (from the pools, through the plan's cached_tables) and then to the step's own keys
(causal), and returns the rotated keys for the runtime to write.

Grid (sequence, query head, tile of BLOCK_M queries). The first query head of each KV head also writes that KV
head's rotated keys for its tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.kernels.triton.layer_ops import rotate_halves
from llmc.kernels.triton.paged_attention import online_softmax_step


@triton.jit
def node_kernel(q_ptr, k_ptr, v_ptr, key_pool_ptr, value_pool_ptr, query_index_ptr, positions_ptr, tables_ptr,
                cached_shape_ptr, lengths_ptr, token_index_ptr, cos_ptr, sin_ptr, q_max, table_stride, out_ptr,
                k_rot_ptr, SCALE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Arguments in TensorRT's AOT plugin order: the node's 13 inputs (cached_shape and token_index unused
    here), the integer scalars (the plan's Qmax, the cached tables' row stride), the 2 outputs."""
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    group = HEADS // KV_HEADS
    kv_head = head // group
    num_cached = tl.load(lengths_ptr + seq * 2)
    num_new = tl.load(lengths_ptr + seq * 2 + 1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_new
    tokens = tl.load(query_index_ptr + seq * q_max + rows, mask=row_ok, other=0)  # [BLOCK_M] int64
    pos = tl.load(positions_ptr + seq * q_max + rows, mask=row_ok, other=0)
    half = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos[:, None] * HALF + half[None, :], mask=row_ok[:, None], other=0.0)
    sin = tl.load(sin_ptr + pos[:, None] * HALF + half[None, :], mask=row_ok[:, None], other=0.0)
    q_row = q_ptr + tokens[:, None] * (HEADS * HEAD_DIM) + head * HEAD_DIM + half[None, :]
    q1, q2 = rotate_halves(tl.load(q_row, mask=row_ok[:, None], other=0.0).to(tl.float32),
                           tl.load(q_row + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32), cos, sin)
    q1, q2 = q1 * SCALE, q2 * SCALE
    k_row = k_ptr + tokens[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + half[None, :]
    if head % group == 0:  # this KV head's rotated keys for the tile's tokens
        k1, k2 = rotate_halves(tl.load(k_row, mask=row_ok[:, None], other=0.0).to(tl.float32),
                               tl.load(k_row + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32), cos, sin)
        out_row = k_rot_ptr + tokens[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + half[None, :]
        tl.store(out_row, k1.to(k_rot_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(out_row + HALF, k2.to(k_rot_ptr.dtype.element_ty), mask=row_ok[:, None])
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for first in range(0, num_cached, BLOCK_N):  # the cached keys, already rotated, from the pools
        keys = first + tl.arange(0, BLOCK_N)
        valid = keys < num_cached
        block = tl.load(tables_ptr + seq * table_stride + keys // BLOCK_SIZE, mask=valid, other=0)
        slot = (block.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE) * KV_HEADS + kv_head
        kc1 = tl.load(key_pool_ptr + slot[:, None] * HEAD_DIM + half[None, :], mask=valid[:, None], other=0.0)
        kc2 = tl.load(key_pool_ptr + slot[:, None] * HEAD_DIM + HALF + half[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q1, tl.trans(kc1.to(tl.float32))) + tl.dot(q2, tl.trans(kc2.to(tl.float32)))
        scores = tl.where(valid[None, :], scores, float("-inf"))
        vc = tl.load(value_pool_ptr + slot[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(scores, vc.to(tl.float32), m_i, l_i, acc)
    for first in range(0, tl.minimum(num_new, (tile + 1) * BLOCK_M), BLOCK_N):  # the step's keys, causal
        keys = first + tl.arange(0, BLOCK_N)
        valid = keys < num_new
        key_tokens = tl.load(query_index_ptr + seq * q_max + keys, mask=valid, other=0)
        key_pos = tl.load(positions_ptr + seq * q_max + keys, mask=valid, other=0)
        kcos = tl.load(cos_ptr + key_pos[:, None] * HALF + half[None, :], mask=valid[:, None], other=0.0)
        ksin = tl.load(sin_ptr + key_pos[:, None] * HALF + half[None, :], mask=valid[:, None], other=0.0)
        new_row = k_ptr + key_tokens[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + half[None, :]
        kn1, kn2 = rotate_halves(tl.load(new_row, mask=valid[:, None], other=0.0).to(tl.float32),
                                 tl.load(new_row + HALF, mask=valid[:, None], other=0.0).to(tl.float32), kcos,
                                 ksin)
        scores = tl.dot(q1, tl.trans(kn1)) + tl.dot(q2, tl.trans(kn2))
        visible = valid[None, :] & (keys[None, :] <= rows[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        vn = tl.load(v_ptr + key_tokens[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :],
                     mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(scores, vn.to(tl.float32), m_i, l_i, acc)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * (HEADS * HEAD_DIM) + head * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def node_attention(q, k, v, key_pool, value_pool, query_index, query_positions, cached_tables, lengths, rope_cos,
                   rope_sin, scale: float, num_heads: int, kv_num_heads: int, block_m: int = 16,
                   block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H*D], k_rotated [T, KVH*D]) of the llmc.PagedAttention node for its inputs (float16 or float32
    pools; int8 pools are the CPU kernels')."""
    seqs, q_max = query_index.shape
    head_dim = key_pool.shape[-1]
    out, k_rotated = torch.empty_like(q), torch.empty_like(k)
    grid = (seqs, num_heads, triton.cdiv(q_max, block_m))
    unused = lengths  # cached_shape and token_index: the node passes them, the kernel reads neither
    node_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), key_pool, value_pool, query_index.contiguous(),
                      query_positions.contiguous(), cached_tables, unused, lengths.contiguous(), unused,
                      rope_cos.contiguous(), rope_sin.contiguous(), q_max, cached_tables.stride(0), out, k_rotated,
                      SCALE=scale, HEADS=num_heads, KV_HEADS=kv_num_heads, HEAD_DIM=head_dim,
                      BLOCK_SIZE=key_pool.shape[1], BLOCK_M=block_m, BLOCK_N=block_n)
    return out, k_rotated
