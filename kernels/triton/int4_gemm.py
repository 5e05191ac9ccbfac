"""Int4 weight-only GEMM / GEMV in Triton over llmc's packing (kernels/quant.py: QuantizedWeight.packed()).

The weight W [N, K] is packed uint8 [N, blocks, block_size / 2], low nibble first, with a scale per (row,
block) and an integer zero point (uint8 codes) or none (symmetric: 8). Each program computes a
[BLOCK_M, BLOCK_N] tile of y = x @ W^T: it streams BLOCK_K columns of codes at a time, dequantizes them in
registers ((code - zero) * scale) and multiplies on the tensor cores (tl.dot). The codes are read as they
lie, BLOCK_K / 2 contiguous bytes a row (vector loads); the low nibbles meet x's even columns and the high
ones its odd columns, two dots a step. Where a step lies in one group (the usual case: groups of 64 or 128),
its scales and zeros are one load per output feature, not one per weight. Batch 1 pads its one row to
BLOCK_M = 16 (tl.dot's least); the weight bytes, what a GEMV is bound by, are read once. A grid of few tiles
(a GEMV) splits K over more programs, so enough weight bytes are in flight to fill the memory bus; each slice
stores its partial product, and the next kernel adds them up as it loads them (no atomics, no zeroed buffer,
no launch for the sum: the engine's consumers are layer_ops' kernels).
Signature: reference.int4_matmul_ref.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, num_blocks, k_per_split,
                      HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: rows of W
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_bytes = num_blocks * (GROUP_SIZE // 2)  # packed bytes per row of W
    pairs = tl.arange(0, BLOCK_K // 2)  # byte j of a step holds columns 2j (low nibble) and 2j + 1 (high)
    k_first = pid_k * k_per_split
    for k0 in range(k_first, tl.minimum(k_first + k_per_split, K), BLOCK_K):
        even = k0 + 2 * pairs  # [BLOCK_K / 2]
        even_ok, odd_ok = even < K, even + 1 < K
        byte = tl.load(packed_ptr + cols[:, None].to(tl.int64) * row_bytes + (k0 // 2 + pairs)[None, :],
                       mask=col_ok[:, None] & even_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K / 2]: contiguous
        if GROUP_SIZE % BLOCK_K == 0:  # the step lies in one group: a scale (and zero) per output feature
            group = cols.to(tl.int64) * num_blocks + k0 // GROUP_SIZE  # [BLOCK_N]
            scale = tl.load(scale_ptr + group, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_ZERO:
                zero = tl.load(zero_ptr + group, mask=col_ok, other=8).to(tl.float32)[:, None]
            else:
                zero = 8.0
        else:  # several groups a step: each pair's own
            group = cols[:, None].to(tl.int64) * num_blocks + even[None, :] // GROUP_SIZE  # [BLOCK_N, BLOCK_K / 2]
            scale = tl.load(scale_ptr + group, mask=col_ok[:, None] & even_ok[None, :], other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(zero_ptr + group, mask=col_ok[:, None] & even_ok[None, :], other=8).to(tl.float32)
            else:
                zero = 8.0
        x_even = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + even[None, :],
                         mask=row_ok[:, None] & even_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K / 2]
        x_odd = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + even[None, :] + 1,
                        mask=row_ok[:, None] & odd_ok[None, :], other=0.0)  # x's zeros past K cancel any code
        w_even = (((byte & 0x0F).to(tl.float32) - zero) * scale).to(x_even.dtype)  # [BLOCK_N, BLOCK_K / 2]
        w_odd = (((byte >> 4).to(tl.float32) - zero) * scale).to(x_even.dtype)
        acc += tl.dot(x_even, tl.trans(w_even)).to(tl.float32) + tl.dot(x_odd, tl.trans(w_odd)).to(tl.float32)
    out = y_ptr + pid_k.to(tl.int64) * M * N + rows[:, None].to(tl.int64) * N + cols[None, :]  # y [SPLIT_K, M, N]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (the CPU interpreter: a stand-in of 8, so the tests take the split-K path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_k_for(tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """K slices for a grid of `tiles` output tiles: enough programs for two waves of the SMs (a batch-1 GEMV has
    few tiles and is bound by how many weight bytes are in flight), at most one slice per BLOCK_K columns."""
    if tiles >= num_sms:
        return 1
    return max(1, min(-(-2 * num_sms // tiles), -(-k // block_k)))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                block_size: int, in_features: int, block_n: int = 64, block_k: int = 64,
                split_k: int | None = None, reduce: bool = True) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] for the packed int4 W (reference.int4_matmul_ref). split_k: K slices (default:
    split_k_for the grid). reduce=False returns the slices' partial products [S, M, N] unsummed (float32 where S >
    1, x's dtype where S is 1), for a consumer that adds them up as it loads them (layer_ops: no launch for the sum)."""
    m, n = x.shape[0], packed.shape[0]
    if block_size % 2 or (block_k % block_size and block_size % block_k) or block_k < 32:
        raise ValueError(f"block_size {block_size} and block_k {block_k}: block_size even, one a multiple of the "
                         "other, block_k at least 32 (tl.dot takes 16 columns, half a step)")
    block_m = 16 if m <= 16 else 32
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = split_k or split_k_for(tiles, in_features, block_k, _num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k  # whole BLOCK_K steps
    split_k = triton.cdiv(in_features, k_per_split)
    y = torch.empty(split_k, m, n, dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _int4_gemm_kernel[grid](x.contiguous(), packed.contiguous(), scale.contiguous(),
                            zero.contiguous() if zero is not None else scale, y, m, n, in_features,
                            packed.shape[1], k_per_split, HAS_ZERO=zero is not None, GROUP_SIZE=block_size,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if not reduce:
        return y
    return y[0] if split_k == 1 else y.sum(0).to(x.dtype)
