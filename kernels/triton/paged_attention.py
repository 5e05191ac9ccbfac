"""Paged attention in Triton over llmc's token-major pools ([NB, B, KVH, D] per layer).

decode:  one query per sequence. Its keys are split into chunks of `tokens_per_split` (split-KV, so a long
         context still spreads over the GPU's SMs); each program attends one (sequence, KV head, split) for all
         the query heads sharing that KV head, and a second kernel merges the splits' partial results.
prefill: a tile of BLOCK_M queries of one sequence and head against its keys up to each query's position
         (causal), through the block table: prompt chunks and speculative verification alike.
Both expect the step's own keys and values already written into the pools. Signatures follow
reference.paged_attention_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(scores, v, m_i, l_i, acc):
    """One block of keys into a running softmax: scores [rows, keys] (float32, -inf where not visible), v
    [keys, D]; returns the updated (max, sum, unnormalized output). A row that has seen nothing yet stays
    finite (its max is taken as 0 until a visible key arrives)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(q_ptr, key_ptr, value_ptr, tables_ptr, lens_ptr, acc_ptr, stats_ptr, scale,
                         table_stride, tokens_per_split, num_splits,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context = tl.load(lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context)
    heads = kv_head * (HEADS // KV_HEADS) + tl.arange(0, GROUP)  # the query heads of this KV head (padded)
    head_ok = tl.arange(0, GROUP) < HEADS // KV_HEADS
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (seq * HEADS + heads[:, None]) * HEAD_DIM + dims[None, :], mask=head_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)  # [GROUP, D]
    m_i = tl.full([GROUP], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCK_N):
        tokens = first + tl.arange(0, BLOCK_N)
        valid = tokens < end
        block = tl.load(tables_ptr + seq * table_stride + tokens // BLOCK_SIZE, mask=valid, other=0)
        rows = (block.to(tl.int64) * BLOCK_SIZE + tokens % BLOCK_SIZE) * KV_HEADS + kv_head  # [BLOCK_N]
        k = tl.load(key_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32)  # [GROUP, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        v = tl.load(value_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc)
    part = (seq * HEADS + heads) * num_splits + split  # [GROUP]: partials [S, H, splits, ...]
    # a split past the context writes nothing (the merge does not read it)
    written = head_ok & (start + tl.zeros([GROUP], tl.int32) < context)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=written[:, None])
    tl.store(stats_ptr + part * 2, m_i, mask=written)
    tl.store(stats_ptr + part * 2 + 1, l_i, mask=written)


@triton.jit
def _decode_merge_kernel(acc_ptr, stats_ptr, out_ptr, lens_ptr, num_splits, tokens_per_split,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)  # seq * HEADS + head
    context = tl.load(lens_ptr + row // HEADS)
    splits = tl.arange(0, SPLITS)
    used = splits * tokens_per_split < context  # the splits that attended something (a graph's grid has more)
    m = tl.load(stats_ptr + (row * num_splits + splits) * 2, mask=used, other=float("-inf"))
    l_i = tl.load(stats_ptr + (row * num_splits + splits) * 2 + 1, mask=used, other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top > float("-inf"), top, 0.0)  # no split used: a context of 0
    weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # unused splits weigh 0
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None],
                  other=0.0)
    total = tl.sum(l_i * weight, 0)  # 0 for an empty context (a CUDA graph's padding row): its output is 0
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, tokens_per_split: int = 256, block_n: int = 32,
                 max_context: int | None = None) -> torch.Tensor:
    """One query per sequence: q [S, H, D] -> [S, H, D] (reference.paged_attention_ref with one query each).
    max_context: the longest context, known on the host (else read from context_lens: a device sync); a CUDA
    graph passes the longest it serves, so the launch grid stays fixed. A context of 0 gives zeros."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_pool.shape
    max_context = int(context_lens.max()) if max_context is None else max_context
    num_splits = max(1, -(-max_context // tokens_per_split))
    acc = torch.empty(seqs, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(seqs, heads, num_splits, 2, dtype=torch.float32, device=q.device)
    group = max(16, triton.next_power_of_2(heads // kv_heads))  # tl.dot takes at least 16 rows
    _decode_split_kernel[(seqs, kv_heads, num_splits)](
        q.contiguous(), key_pool, value_pool, block_tables, context_lens, acc, stats, scale,
        block_tables.stride(0), tokens_per_split, num_splits, HEADS=heads, KV_HEADS=kv_heads, GROUP=group,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n)
    out = torch.empty_like(q)
    _decode_merge_kernel[(seqs * heads,)](acc, stats, out, context_lens, num_splits, tokens_per_split, HEADS=heads,
                                          HEAD_DIM=head_dim, SPLITS=triton.next_power_of_2(num_splits))
    return out


@triton.jit
def _prefill_kernel(q_ptr, key_ptr, value_ptr, out_ptr, tables_ptr, lens_ptr, starts_ptr, scale, table_stride,
                    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_end = tl.load(starts_ptr + seq), tl.load(starts_ptr + seq + 1)
    context = tl.load(lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # this tile's queries, 0-based within the sequence
    row_ok = rows < q_end - q_start
    positions = context - (q_end - q_start) + rows  # [BLOCK_M]
    kv_head = head // (HEADS // KV_HEADS)
    dims = tl.arange(0, HEAD_DIM)
    tokens_q = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + (tokens_q[:, None] * HEADS + head) * HEAD_DIM + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.minimum(context, context - (q_end - q_start) + (tile + 1) * BLOCK_M)  # keys this tile can see
    for first in range(0, last, BLOCK_N):
        tokens = first + tl.arange(0, BLOCK_N)
        valid = tokens < last
        block = tl.load(tables_ptr + seq * table_stride + tokens // BLOCK_SIZE, mask=valid, other=0)
        slots = (block.to(tl.int64) * BLOCK_SIZE + tokens % BLOCK_SIZE) * KV_HEADS + kv_head
        k = tl.load(key_ptr + slots[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        visible = valid[None, :] & (tokens[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        v = tl.load(value_ptr + slots[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (tokens_q[:, None] * HEADS + head) * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, query_start: torch.Tensor, scale: float, max_query_len: int,
                  block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """Queries of several sequences (query_start [S + 1] delimits them) with causal masks: q [T, H, D] ->
    [T, H, D] (reference.paged_attention_ref). max_query_len: the longest sequence's query count."""
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_pool.shape
    out = torch.empty_like(q)
    grid = (block_tables.shape[0], heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](q.contiguous(), key_pool, value_pool, out, block_tables, context_lens, query_start, scale,
                          block_tables.stride(0), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                          BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
