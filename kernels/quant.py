"""Weight-only quantization math (numpy): group-wise RTN, dequantization, MatMulNBits packing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A [N, K] weight as integer codes per group of `block_size` input channels.

    w ≈ (q - zero) * scale, with q in [0, 2^bits); zero is None for symmetric weights (then the
    implicit zero is 2^(bits-1), as com.microsoft.MatMulNBits assumes), uint8 codes for integer
    zero points, or float32. K is padded up to whole blocks.
    """

    q: np.ndarray  # uint8 [N, num_blocks, block_size]
    scale: np.ndarray  # float32 [N, num_blocks]
    zero: np.ndarray | None  # [N, num_blocks]: uint8 or float32; None when symmetric
    bits: int
    block_size: int
    in_features: int

    def dequantize(self) -> np.ndarray:
        """The float weight [N, K] these codes stand for."""
        zero = self.zero.astype(np.float32)[..., None] if self.zero is not None else np.float32(2 ** (self.bits - 1))
        w = (self.q.astype(np.float32) - zero) * self.scale[..., None]
        return w.reshape(self.q.shape[0], -1)[:, : self.in_features]

    def packed(self) -> np.ndarray:
        """MatMulNBits B input: [N, num_blocks, block_size * bits / 8], low nibble first."""
        assert self.bits == 4, "only 4-bit packing is implemented"
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zeros(self) -> np.ndarray:
        """MatMulNBits zero_points input: float [N * blocks], or uint8 codes two per byte per row."""
        if self.zero.dtype != np.uint8:
            return self.zero.reshape(-1)
        zero = self.zero
        if zero.shape[1] % 2:
            zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), np.uint8)], axis=1)
        return (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 zero_point: str = "int") -> QuantizedWeight:
    """Round-to-nearest per group: symmetric (max |w| -> 2^(bits-1) - 1) or min/max with a zero point.

    zero_point "int" rounds the zero point to a code (fast kernels); "float" keeps it exact, so
    the group minimum sits on code 0 (reproduces a Q4_1 grid).
    """
    n, k = w.shape
    num_blocks = -(-k // block_size)
    padded = np.zeros((n, num_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    groups = padded.reshape(n, num_blocks, block_size)  # [N, blocks, bs]
    if k % block_size:  # the padding must not widen the last group's range
        last = groups[:, -1, : k % block_size]
        lo_last, hi_last = last.min(-1), last.max(-1)
    qmax = 2 ** bits - 1
    if symmetric:
        absmax = np.abs(groups).max(-1)
        scale = absmax / (2 ** (bits - 1) - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.round(groups / scale[..., None]) + 2 ** (bits - 1), 0, qmax).astype(np.uint8)
        return QuantizedWeight(q, scale, None, bits, block_size, k)
    lo, hi = groups.min(-1), groups.max(-1)  # [N, blocks]: the grid spans each group's own range
    if k % block_size:
        lo[:, -1], hi[:, -1] = lo_last, hi_last
    if zero_point == "int":  # the grid must contain 0 so that a rounded zero point stays in range
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = (-lo / scale).astype(np.float32)
    if zero_point == "int":
        zero = np.clip(np.round(zero), 0, qmax).astype(np.uint8)
    q = np.clip(np.round(groups / scale[..., None] + zero[..., None].astype(np.float32)), 0, qmax).astype(np.uint8)
    return QuantizedWeight(q, scale, zero, bits, block_size, k)
