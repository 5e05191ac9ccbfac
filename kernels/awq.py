"""AWQ math (Lin et al., 2023): activation-aware per-channel scales and weight-clip search.

Scaling input channel j of a linear by s_j (and its input by 1/s_j) leaves the float output
unchanged but moves rounding error away from the channels with large activations. The scale is
s = mean|x|^a / mean|w|^(1-a) ("duo scaling"; the paper's form is mean|x|^a), with a found by a grid
search that minimises the output error of the block the linears feed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmc.kernels.quant import GridConfig, fake_quantize, to_groups


def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max: [K]."""
    w = torch.cat(weights, dim=0)  # [sum N, K]
    groups = to_groups(w.abs(), group_size)  # [N, G, bs]
    normed = groups / groups.amax(-1, keepdim=True).clamp(min=1e-12)
    return normed.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0)


def scales_for(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    """Per-input-channel scales [K] for one grid point, normalised so that max * min = 1."""
    s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4) if duo else x_mean.pow(ratio)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(linears: list[torch.nn.Linear], x_mean: torch.Tensor, block: Callable[[], torch.Tensor],
                 cfg: GridConfig, n_grid: int, duo: bool) -> tuple[torch.Tensor, float, float]:
    """Grid-search the exponent in [0, 1); returns (scales [K], best ratio, its block output MSE).

    `block()` runs the block the linears feed on a fixed input sample; the linears' weights are
    temporarily replaced by Q(W * s) / s for each candidate and restored afterwards.
    """
    originals = [lin.weight.data.clone() for lin in linears]
    w_mean = weight_magnitude(originals, cfg.group_size)
    reference = block()
    best = (float("inf"), 0.0, torch.ones_like(x_mean))
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = scales_for(x_mean, w_mean, ratio, duo)
            for lin, w in zip(linears, originals):
                lin.weight.data = fake_quantize(w * s, cfg) / s
            err = float((block() - reference).pow(2).mean())
            if err < best[0]:
                best = (err, ratio, s)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best[2], best[1], best[0]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: GridConfig, n_grid: int = 20, max_shrink: float = 0.5,
                rows_per_batch: int = 256) -> torch.Tensor:
    """Per (row, group) clip threshold [N, G] minimising the group-wise output error on sample inputs x [t, K]."""
    n, k = w.shape
    pad = -k % cfg.group_size
    x_groups = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, cfg.group_size)  # [t, G, bs]
    x_groups = x_groups.transpose(0, 1)  # [G, t, bs]
    best_max = torch.empty(n, x_groups.shape[0])
    for r0 in range(0, n, rows_per_batch):
        w_groups = to_groups(w[r0:r0 + rows_per_batch], cfg.group_size)  # [n, G, bs]
        rows = w_groups.shape[0]
        reference = torch.bmm(x_groups, w_groups.permute(1, 2, 0))  # [G, t, n]: per-group partial outputs
        org_max = w_groups.abs().amax(-1, keepdim=True)  # [n, G, 1]
        min_err = torch.full((rows, w_groups.shape[1]), float("inf"))
        best = org_max[..., 0].clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w_groups, max_val), -max_val)
            q = fake_quantize(clipped.reshape(rows, -1), cfg).reshape(clipped.shape)
            err = (torch.bmm(x_groups, q.permute(1, 2, 0)) - reference).pow(2).mean(1).T  # [n, G]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val[..., 0], best)
        best_max[r0:r0 + rows] = best
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] clamped to ±max_val [N, G] group by group."""
    limit = max_val.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    return torch.maximum(torch.minimum(w, limit), -limit)
