"""Reference kernels in plain torch: the numerical definition the emitted engines must match."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as Llama does."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rope_tables(max_position: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_position, head_dim] in the rotate-half layout (as transformers builds them)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by per-token cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V [T, KVH, D] into the pools [NB, B, KVH, D] at flat slots, in place (rounded to the
    pools' dtype)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_pool.shape
    k_pool.view(num_blocks * block_size, num_kv_heads, head_dim)[slot_mapping] = k_new.to(k_pool.dtype)
    v_pool.view(num_blocks * block_size, num_kv_heads, head_dim)[slot_mapping] = v_new.to(v_pool.dtype)


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start: torch.Tensor, positions: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of T flattened query tokens over paged caches; returns [T, H*D].

    The new tokens' K/V (k_new, v_new [T, KVH, D]) are overlaid at their positions, so the
    pools may or may not already hold them. One sequence at a time: slow and plainly correct.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    block_size = k_pool.shape[1]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype)
    for s in range(context_lens.shape[0]):
        start, end = int(query_start[s]), int(query_start[s + 1])
        if end == start:
            continue
        ctx = int(context_lens[s])
        num_blocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[s, :num_blocks].long()
        keys = k_pool[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(q.dtype)  # [L, KVH, D], a copy
        values = v_pool[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(q.dtype)
        pos = positions[start:end].long()
        keys[pos] = k_new[start:end]
        values[pos] = v_new[start:end]
        group = num_heads // num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # [L, H, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end], keys) * scale  # [H, Q, L]
        allowed = torch.arange(ctx)[None, :] <= pos[:, None]  # [Q, L]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values)
    return out.reshape(num_tokens, num_heads * head_dim)
