"""Weight-only quantization math: the group grid, encode/decode, fake quantization and MatMulNBits packing.

One grid for every method: RTN uses it directly, AWQ searches scales around it, GPTQ encodes
column by column with it. `w ≈ (q - zero) * scale` per group of `group_size` input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class GridConfig:
    """How weights are quantized: bits, group size, symmetric or zero point ("int" codes or exact "float")."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    zero_point: str = "int"

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A [N, K] weight as integer codes per group of `block_size` input channels.

    zero is None for symmetric weights (then the implicit zero is 2^(bits-1), as
    com.microsoft.MatMulNBits assumes), uint8 codes for integer zero points, or float32.
    K is padded up to whole blocks.
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

    def split_blocks(self, block_size: int) -> QuantizedWeight:
        """The same weight in blocks of block_size (a divisor of this block size): each group's scale and
        zero point repeated over its blocks, trailing all-padding blocks dropped."""
        if block_size >= self.block_size:
            return self
        n, factor = self.q.shape[0], self.block_size // block_size
        num_blocks = -(-self.in_features // block_size)

        def per_block(a: np.ndarray) -> np.ndarray:  # [N, blocks] -> [N, blocks * factor][:, :num_blocks]
            return np.ascontiguousarray(np.repeat(a, factor, axis=1)[:, :num_blocks])

        q = np.ascontiguousarray(self.q.reshape(n, -1, block_size)[:, :num_blocks])  # [N, num_blocks, block_size]
        return QuantizedWeight(q, per_block(self.scale), None if self.zero is None else per_block(self.zero),
                               self.bits, block_size, self.in_features)

    def packed(self) -> np.ndarray:
        """MatMulNBits B input: [N, num_blocks, block_size * bits / 8], low bits first."""
        if self.bits == 8:
            return self.q.astype(np.uint8)
        assert self.bits == 4, "only 4- and 8-bit packing is implemented"
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zeros(self) -> np.ndarray:
        """MatMulNBits zero_points input: float [N * blocks], or uint8 codes (4-bit: two per byte per row)."""
        if self.zero.dtype != np.uint8 or self.bits == 8:
            return self.zero.reshape(-1)
        zero = self.zero
        if zero.shape[1] % 2:
            zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), np.uint8)], axis=1)
        return (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Weights that read the same input, stacked along N into one (one matmul instead of several);
    None when their formats differ (bits, block size, zero points)."""
    first = weights[0]
    kinds = {(w.bits, w.block_size, w.in_features, None if w.zero is None else w.zero.dtype) for w in weights}
    if len(kinds) > 1:
        return None
    zero = None if first.zero is None else np.concatenate([w.zero for w in weights])
    return QuantizedWeight(np.concatenate([w.q for w in weights]), np.concatenate([w.scale for w in weights]),
                           zero, first.bits, first.block_size, first.in_features)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size]; a partial last group is padded with copies of its last column,
    so padding never widens a group's range."""
    n, k = w.shape
    pad = -k % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, group_size)


def grid(groups: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [N, G] for groups [N, G, bs]: symmetric (max |w| -> 2^(bits-1) - 1) or min/max.

    zero_point "int" rounds the zero point to a code (fast kernels; the grid then contains 0);
    "float" keeps it exact, so the group minimum sits on code 0 (reproduces a Q4_1 grid).
    """
    if cfg.symmetric:
        scale = groups.abs().amax(-1) / (2 ** (cfg.bits - 1) - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, 2 ** (cfg.bits - 1))
    lo, hi = groups.amin(-1), groups.amax(-1)
    if cfg.zero_point == "int":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo) / cfg.qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = -lo / scale
    if cfg.zero_point == "int":
        zero = zero.round().clamp(0, cfg.qmax)
    return scale, zero


def grid_mse(groups: torch.Tensor, cfg: GridConfig, max_shrink: float = 0.8, steps: int = 100,
             norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of `grid`, shrunk per group by the factor in (1 - max_shrink, 1] that minimises
    sum |Q(w) - w|^norm (the reference GPTQ quantizer's `mse` option): clipping a few outliers
    buys a finer step for the rest."""
    best_scale, best_zero = grid(groups, cfg)
    best_err = torch.full(best_scale.shape, float("inf"), dtype=groups.dtype)
    for i in range(int(max_shrink * steps)):
        scale, zero = grid(groups * (1 - i / steps), cfg)
        deq = decode(encode(groups, scale[..., None], zero[..., None], cfg), scale[..., None], zero[..., None])
        err = (deq - groups).abs().pow(norm).sum(-1)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """Codes (as floats) for w on the grid; shapes broadcast."""
    return (w / scale + zero).round().clamp(0, cfg.qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weights that codes stand for; shapes broadcast."""
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """w [N, K] rounded to its RTN grid and back (the reference for what the engine computes)."""
    groups = to_groups(w, cfg.group_size)  # [N, G, bs]
    scale, zero = grid(groups, cfg)
    deq = decode(encode(groups, scale[..., None], zero[..., None], cfg), scale[..., None], zero[..., None])
    return deq.reshape(w.shape[0], -1)[:, : w.shape[1]]


def pack_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: GridConfig,
               in_features: int) -> QuantizedWeight:
    """Codes [N, G, bs] with their grid -> QuantizedWeight (numpy, ready to emit)."""
    if cfg.symmetric:
        zero_np = None
    elif cfg.zero_point == "int":
        zero_np = zero.numpy().astype(np.uint8)
    else:
        zero_np = zero.numpy().astype(np.float32)
    return QuantizedWeight(q.numpy().astype(np.uint8), scale.numpy().astype(np.float32), zero_np,
                           cfg.bits, cfg.group_size, in_features)


def quantize_rtn(w: np.ndarray | torch.Tensor, cfg: GridConfig, mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest per group, on the min/max grid or (mse) the searched one."""
    w = torch.as_tensor(w).detach().float()
    groups = to_groups(w, cfg.group_size)  # [N, G, bs]
    scale, zero = grid_mse(groups, cfg) if mse else grid(groups, cfg)
    return pack_codes(encode(groups, scale[..., None], zero[..., None], cfg), scale, zero, cfg, w.shape[1])
