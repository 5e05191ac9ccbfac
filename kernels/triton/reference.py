"""Torch references of the Triton kernels, with the same signatures: what the kernels must compute."""

from __future__ import annotations

import torch


def paged_attention_ref(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Attention of each sequence's new queries over its cached and new keys, through its block table.

    q [T, H, D]: the step's queries, sequence by sequence (query_start [S + 1] delimits them); key_pool /
    value_pool [NB, B, KVH, D] already hold the step's keys and values; block_tables [S, M] int32;
    context_lens [S]: each sequence's tokens so far, the step's included. Query i of a sequence with q_len
    queries sits at position context_len - q_len + i and sees keys up to it (causal). Returns [T, H, D] in
    q's dtype, computed in float32.
    """
    _, block_size, kv_heads, head_dim = key_pool.shape
    heads = q.shape[1]
    out = torch.empty_like(q)
    for s in range(block_tables.shape[0]):
        start, end, ctx = int(query_start[s]), int(query_start[s + 1]), int(context_lens[s])
        blocks = block_tables[s, :-(-ctx // block_size)].long()
        keys = key_pool[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()  # [L, KVH, D]
        values = value_pool[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        queries = q[start:end].float()  # [Q, H, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale  # [H, Q, L]
        positions = ctx - (end - start) + torch.arange(end - start)
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > positions[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, block_size: int,
                    in_features: int) -> torch.Tensor:
    """The [N, K] float32 weight of llmc's 4-bit packing (kernels/quant.py QuantizedWeight.packed()):
    packed uint8 [N, blocks, block_size / 2] (low nibble first), scale [N, blocks], zero uint8 codes
    [N, blocks] or None (symmetric: 8)."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1], block_size).float()
    zeros = zero.float()[..., None] if zero is not None else 8.0
    weight = (codes - zeros) * scale.float()[..., None]  # [N, blocks, block_size]
    return weight.reshape(packed.shape[0], -1)[:, :in_features]


def int4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    block_size: int, in_features: int) -> torch.Tensor:
    """x [M, K] @ W^T for the packed int4 weight W [N, K]; float32 accumulation, x's dtype out."""
    return (x.float() @ dequantize_int4(packed, scale, zero, block_size, in_features).T).to(x.dtype)


def summed(x: torch.Tensor) -> torch.Tensor:
    """A layer op's input [T, N] as float32: split-K partials [S, T, N] added up."""
    return x.float().sum(0) if x.dim() == 3 else x.float()


def add_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm of x (or partials [S, T, N]), or of residual + x with the sum written into residual; float32
    inside, out_dtype (default x's) out."""
    x32 = summed(x)
    if residual is not None:
        residual.copy_((residual.float() + x32).to(residual.dtype))
        x32 = residual.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(out_dtype or x.dtype)


def rope_write_kv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, heads: int,
                      kv_heads: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate q and k of the fused projection [T, (H + 2 KVH) * D] (or partials [S, T, ...]; half rotation), write
    k and v into the pools at the non-negative slots; returns q [T, H, D] in out_dtype (default qkv's)."""
    tokens = qkv.shape[-2]
    head_dim = 2 * cos.shape[1]
    q, k, v = summed(qkv).view(tokens, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    c, s = cos[positions.long()][:, None], sin[positions.long()][:, None]  # [T, 1, D / 2]

    def rotate(x):
        x1, x2 = x[..., :head_dim // 2].float(), x[..., head_dim // 2:].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    keep = slots >= 0
    block_size = key_pool.shape[1]
    blocks, offsets = slots[keep].long() // block_size, slots[keep].long() % block_size
    key_pool[blocks, offsets] = rotate(k)[keep].to(key_pool.dtype)
    value_pool[blocks, offsets] = v[keep].to(value_pool.dtype)
    return rotate(q).to(out_dtype or qkv.dtype)


def silu_mul_ref(gate_up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[T, 2I] (gate, then up; or partials [S, T, 2I]) -> silu(gate) * up [T, I]."""
    gate, up = summed(gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(out_dtype or gate_up.dtype)
