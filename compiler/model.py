"""llmc's own Llama-family model in torch, for a flattened batch over a paged KV cache.

This is the compiler's IR (the emitters read its weights) and the numerical reference that
engines are tested against. It implements the engine step contract (docs/architecture.md) directly.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.artifacts.geometry import ModelGeometry
from llmc.kernels import reference as ref


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; weight names are llmc's (see importer for the HF map)."""

    def __init__(self, geo: ModelGeometry):
        super().__init__()
        q_dim, kv_dim = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
        self.attn_norm = nn.Parameter(torch.ones(geo.hidden_size))
        self.q_proj = nn.Linear(geo.hidden_size, q_dim, bias=geo.attention_bias)
        self.k_proj = nn.Linear(geo.hidden_size, kv_dim, bias=geo.attention_bias)
        self.v_proj = nn.Linear(geo.hidden_size, kv_dim, bias=geo.attention_bias)
        self.o_proj = nn.Linear(q_dim, geo.hidden_size, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(geo.hidden_size))
        self.gate_proj = nn.Linear(geo.hidden_size, geo.intermediate_size, bias=False)
        self.up_proj = nn.Linear(geo.hidden_size, geo.intermediate_size, bias=False)
        self.down_proj = nn.Linear(geo.intermediate_size, geo.hidden_size, bias=False)
        self.geo = geo

    def attention(self, h, cos, sin, step, k_pool, v_pool):
        """Self-attention of normed h [T, hidden] over the paged cache, through o_proj; [T, hidden]."""
        geo = self.geo
        num_tokens = h.shape[0]
        q = ref.apply_rope(self.q_proj(h).view(num_tokens, geo.num_heads, geo.head_dim), cos, sin)
        k = ref.apply_rope(self.k_proj(h).view(num_tokens, geo.num_kv_heads, geo.head_dim), cos, sin)
        v = self.v_proj(h).view(num_tokens, geo.num_kv_heads, geo.head_dim)  # [T, KVH, D]
        ref.write_kv(k_pool, v_pool, k, v, step["slot_mapping"])
        attn = ref.paged_attention(q, k, v, k_pool, v_pool, step["block_tables"], step["context_lens"],
                                   step["query_start"], step["positions"], geo.head_dim ** -0.5)
        return self.o_proj(attn)

    def mlp(self, h):
        """SwiGLU of normed h [T, hidden]; [T, hidden]."""
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x, cos, sin, step, k_pool, v_pool):
        eps = self.geo.rms_norm_eps
        x = x + self.attention(ref.rms_norm(x, self.attn_norm, eps), cos, sin, step, k_pool, v_pool)
        return x + self.mlp(ref.rms_norm(x, self.mlp_norm, eps))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, geo: ModelGeometry):
        super().__init__()
        self.geo = geo
        self.embed = nn.Embedding(geo.vocab_size, geo.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(geo) for _ in range(geo.num_layers))
        self.norm = nn.Parameter(torch.ones(geo.hidden_size))
        self.lm_head = None if geo.tie_word_embeddings else nn.Linear(geo.hidden_size, geo.vocab_size, bias=False)
        cos, sin = ref.rope_tables(geo.max_position, geo.head_dim, geo.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, D]
        self.register_buffer("rope_sin", sin, persistent=False)

    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_kv_cache(self, num_blocks: int, block_size: int,
                     dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed K/V pools per layer, [num_blocks, block_size, kv_heads, head_dim]."""
        shape = self.geo.pool_shape(num_blocks, block_size)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(self.geo.num_layers)]

    @torch.no_grad()
    def forward(self, input_ids, positions, slot_mapping, block_tables, context_lens, query_start,
                logits_index, kv_cache) -> torch.Tensor:
        """One engine step (docs/architecture.md); writes K/V into kv_cache in place; returns [N, vocab]."""
        step = {"positions": positions, "slot_mapping": slot_mapping, "block_tables": block_tables,
                "context_lens": context_lens, "query_start": query_start}
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, D]
        x = self.embed(input_ids)  # [T, hidden]
        for layer, (k_pool, v_pool) in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, step, k_pool, v_pool)
        x = ref.rms_norm(x[logits_index], self.norm, self.geo.rms_norm_eps)  # [N, hidden]
        return (x @ self.lm_head_weight().T).float()  # [N, vocab]
