"""The CUDA engine's fused elementwise kernels, so one decoder layer is ten launches, not sixty:

add_rms_norm: the residual add and the RMSNorm after it, in one pass over each row.
rope_write_kv: rotary embedding of the fused QKV projection's q and k heads, and the step's keys and values
               written into the paged pools at their slots (a negative slot writes nothing: the padding rows of a
               CUDA-graph batch).
silu_mul:      SwiGLU's silu(gate) * up over the fused gate/up projection.
Signatures follow reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(residual_ptr + row * hidden + cols, x.to(residual_ptr.dtype.element_ty), mask=ok)
    rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (x * rms * weight).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [T, hidden], or of residual + x with the sum written back into residual (in place)."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, hidden, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """Llama's half rotation of the halves x1, x2 of a head ([..., D / 2] each, float32)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, q_out_ptr, key_ptr, value_ptr,
                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr):
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # head < HEADS: a query head; else a KV head
    width = (HEADS + 2 * KV_HEADS) * 2 * HALF  # one token's row of the fused projection
    dims = tl.arange(0, HALF)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + position * HALF + dims)
    sin = tl.load(sin_ptr + position * HALF + dims)
    src = qkv_ptr + token * width + head * 2 * HALF
    x1 = tl.load(src + dims).to(tl.float32)
    x2 = tl.load(src + HALF + dims).to(tl.float32)
    rotated1, rotated2 = rotate_halves(x1, x2, cos, sin)
    if head < HEADS:
        dst = q_out_ptr + (token * HEADS + head) * 2 * HALF
        tl.store(dst + dims, rotated1.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + dims, rotated2.to(q_out_ptr.dtype.element_ty))
    else:
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            kv_head = head - HEADS
            row = (slot * KV_HEADS + kv_head) * 2 * HALF
            tl.store(key_ptr + row + dims, rotated1.to(key_ptr.dtype.element_ty))
            tl.store(key_ptr + row + HALF + dims, rotated2.to(key_ptr.dtype.element_ty))
            v_src = qkv_ptr + token * width + (HEADS + KV_HEADS + kv_head) * 2 * HALF
            v1, v2 = tl.load(v_src + dims), tl.load(v_src + HALF + dims)
            tl.store(value_ptr + row + dims, v1.to(value_ptr.dtype.element_ty))
            tl.store(value_ptr + row + HALF + dims, v2.to(value_ptr.dtype.element_ty))


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, heads: int,
                  kv_heads: int) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * D] (q heads, then k, then v); cos / sin [P, D / 2] float32; positions, slots [T].
    Returns the rotated queries [T, H, D]; writes rotated keys and values into the pools [NB, B, KVH, D] at
    slot // B, slot % B (slot < 0: not written)."""
    tokens = qkv.shape[0]
    half = cos.shape[1]
    q = torch.empty(tokens, heads, 2 * half, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(tokens, heads + kv_heads)](qkv, cos, sin, positions, slots, q, key_pool, value_pool,
                                                      HEADS=heads, KV_HEADS=kv_heads, HALF=half)
    return q


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out
