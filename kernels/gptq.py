"""GPTQ math (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer inputs.

Follows the reference algorithm: H = 2/n X^T X, dead inputs (H_jj = 0) zeroed, dampening of
`damp` x mean(diag H), the upper Cholesky factor of H^-1, lazy batch updates of `block` columns.
Act-order visits columns by decreasing H_jj; its groups are static (their grid is fixed from the
original weights up front), so the codes stay in input order and the engine needs no permutation.
"""

from __future__ import annotations

import torch

from llmc.errors import PassError
from llmc.kernels.quant import GridConfig, QuantizedWeight, decode, encode, grid, grid_mse, pack_codes, to_groups


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/n X^T X for inputs x [n, K], in float64 for a stable Cholesky."""
    x = x.double()
    return 2.0 / x.shape[0] * (x.T @ x)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GridConfig, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, mse: bool = False) -> QuantizedWeight:
    """Quantize w [N, K] given the Hessian h [K, K] of its inputs; `mse` searches each group's grid
    (kernels.quant.grid_mse) instead of spanning its min/max."""
    group_grid = grid_mse if mse else grid
    n, k = w.shape
    gs = cfg.group_size
    block = max(block, gs)  # groups never straddle a lazy-update block (both are powers of two)
    w = w.detach().double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    num_groups = -(-k // gs)
    scale = torch.zeros(n, num_groups, dtype=torch.float64)
    zero = torch.zeros(n, num_groups, dtype=torch.float64)
    perm = torch.arange(k)
    if act_order:
        scale[:], zero[:] = group_grid(to_groups(w, gs), cfg)  # static groups from the original weights
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise PassError(f"GPTQ: the input Hessian is not positive definite even after dampening ({err}); "
                        "raise gptq.damp or add calibration text") from None
    codes = torch.zeros(n, k, dtype=torch.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not act_order and col % gs == 0:  # a new group: its grid from the error-updated weights
                scale[:, g], zero[:, g] = (t[:, 0] for t in group_grid(w1[:, i:i + gs][:, None, :], cfg))
            q = encode(w1[:, i], scale[:, g], zero[:, g], cfg)
            codes[:, i1 + i] = q
            err = (w1[:, i] - decode(q, scale[:, g], zero[:, g])) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]  # back to input order
    return pack_codes(to_groups(codes, gs), scale.float(), zero.float(), cfg, k)
