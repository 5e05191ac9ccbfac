"""The CUDA engine's fused elementwise kernels, so one decoder layer is ten launches, not sixty:

add_rms_norm: the residual add and the RMSNorm after it, in one pass over each row.
rope_write_kv: rotary embedding of the fused QKV projection's q and k heads, and the step's keys and values
               written into the paged pools at their slots (a negative slot writes nothing: the padding rows of a
               CUDA-graph batch).
silu_mul:      SwiGLU's silu(gate) * up over the fused gate/up projection.
Each reads its input as a tensor [T, N] or as the split-K partial products [S, T, N] of int4_matmul(reduce=False),
which it adds up as it loads them (so a split GEMV costs no launch for its sum), and writes out_dtype (default: the
input's). Signatures follow reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def load_summed(ptr, offsets, mask, split_stride, SPLITS: tl.constexpr):
    """ptr[offsets] summed over SPLITS slices split_stride elements apart (split-K partials), float32."""
    total = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):
        total += tl.load(ptr + split * split_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    return total


def _splits(x: torch.Tensor) -> tuple[int, int]:
    """(slices, elements a slice) of a consumer's input: [T, N], or partials [S, T, N]."""
    return (x.shape[0], x[0].numel()) if x.dim() == 3 else (1, x.numel())


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps, split_stride,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = load_summed(x_ptr, row * hidden + cols, ok, split_stride, SPLITS)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(residual_ptr + row * hidden + cols, x.to(residual_ptr.dtype.element_ty), mask=ok)
    rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (x * rms * weight).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm of x [T, hidden] (or partials [S, T, hidden]), or of residual + x with the sum written back into
    residual (in place)."""
    splits, split_stride = _splits(x)
    rows, hidden = x.shape[-2:]
    out = torch.empty(rows, hidden, dtype=out_dtype or x.dtype, device=x.device)
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, hidden, eps, split_stride,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
                                  SPLITS=splits)
    return out


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """Llama's half rotation of the halves x1, x2 of a head ([..., D / 2] each, float32)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, q_out_ptr, key_ptr, value_ptr,
                          split_stride, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                          SPLITS: tl.constexpr):
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # head < HEADS: a query head; else a KV head
    width = (HEADS + 2 * KV_HEADS) * 2 * HALF  # one token's row of the fused projection
    dims = tl.arange(0, HALF)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + position * HALF + dims)
    sin = tl.load(sin_ptr + position * HALF + dims)
    src = token * width + head * 2 * HALF  # offsets into (each slice of) qkv
    every = dims < HALF
    x1 = load_summed(qkv_ptr, src + dims, every, split_stride, SPLITS)
    x2 = load_summed(qkv_ptr, src + HALF + dims, every, split_stride, SPLITS)
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
            v_src = token * width + (HEADS + KV_HEADS + kv_head) * 2 * HALF
            v1 = load_summed(qkv_ptr, v_src + dims, every, split_stride, SPLITS)
            v2 = load_summed(qkv_ptr, v_src + HALF + dims, every, split_stride, SPLITS)
            tl.store(value_ptr + row + dims, v1.to(value_ptr.dtype.element_ty))
            tl.store(value_ptr + row + HALF + dims, v2.to(value_ptr.dtype.element_ty))


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, heads: int,
                  kv_heads: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * D] (q heads, then k, then v; or partials [S, T, ...]); cos / sin [P, D / 2] float32;
    positions, slots [T]. Returns the rotated queries [T, H, D]; writes rotated keys and values into the pools
    [NB, B, KVH, D] at slot // B, slot % B (slot < 0: not written)."""
    splits, split_stride = _splits(qkv)
    tokens = qkv.shape[-2]
    half = cos.shape[1]
    q = torch.empty(tokens, heads, 2 * half, dtype=out_dtype or qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(tokens, heads + kv_heads)](qkv, cos, sin, positions, slots, q, key_pool, value_pool,
                                                      split_stride, HEADS=heads, KV_HEADS=kv_heads, HALF=half,
                                                      SPLITS=splits)
    return q


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, split_stride, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    row, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = load_summed(gate_up_ptr, row * 2 * inter + cols, ok, split_stride, SPLITS)
    up = load_summed(gate_up_ptr, row * 2 * inter + inter + cols, ok, split_stride, SPLITS)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, block: int = 1024, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up; or partials [S, T, 2I]) -> silu(gate) * up [T, I]."""
    splits, split_stride = _splits(gate_up)
    rows, inter = gate_up.shape[-2], gate_up.shape[-1] // 2
    out = torch.empty(rows, inter, dtype=out_dtype or gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, split_stride, BLOCK=block,
                                                        SPLITS=splits)
    return out
