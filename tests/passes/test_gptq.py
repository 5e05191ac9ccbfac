"""GPTQ math against properties that must hold, and against RTN on correlated inputs."""

import numpy as np
import pytest
import torch

from llmc.kernels.gptq import gptq_quantize, hessian
from llmc.kernels.quant import GridConfig, decode, encode, grid, grid_mse, quantize_rtn, to_groups


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs that live near a low-dimensional subspace, as real activations do: [n, K]."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    return low_rank + 0.1 * torch.randn(n, k, generator=g)


def _output_error(x, w, deq):
    return float((x @ (w - torch.from_numpy(deq)).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("cfg", [GridConfig(4, 32), GridConfig(4, 64, True), GridConfig(4, 32, False, "float")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(cfg, act_order):
    x, w = _correlated_inputs(2048, 96), torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    qw = gptq_quantize(w, hessian(x), cfg, act_order=act_order)
    rtn = _output_error(x, w, quantize_rtn(w, cfg).dequantize())
    assert qw.q.max() <= cfg.qmax and qw.dequantize().shape == w.shape
    assert _output_error(x, w, qw.dequantize()) < 0.8 * rtn


def test_uncorrelated_inputs_reduce_gptq_to_rtn():
    """With H = I no error can be compensated: every column rounds to its RTN code."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    cfg = GridConfig(4, 32)
    np.testing.assert_array_equal(gptq_quantize(w, torch.eye(64), cfg).q, quantize_rtn(w, cfg).q)


def test_dead_inputs_are_zeroed():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0  # an input channel that never fires
    qw = gptq_quantize(torch.randn(8, 64), hessian(x), GridConfig(4, 32, True))
    assert np.all(qw.dequantize()[:, 5] == 0)


def test_act_order_keeps_static_groups_in_input_order():
    """The codes' grid is the original weights' RTN grid per group, in input order (no runtime permutation)."""
    x, w = _correlated_inputs(1024, 64, seed=3), torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    cfg = GridConfig(4, 16)
    qw = gptq_quantize(w, hessian(x), cfg, act_order=True)
    scale, zero = grid(to_groups(w.double(), 16), cfg)
    np.testing.assert_allclose(qw.scale, scale.float().numpy(), rtol=1e-6)
    expected = decode(torch.from_numpy(qw.q).float(), torch.from_numpy(qw.scale)[..., None],
                      zero.float()[..., None]).reshape(8, 64)
    np.testing.assert_allclose(qw.dequantize(), expected.numpy(), atol=1e-6)


def test_partial_last_group():
    """K = 80 with groups of 32: the last group has 16 columns and still quantizes (padded codes unused)."""
    x, w = _correlated_inputs(1024, 80), torch.randn(8, 80)
    qw = gptq_quantize(w, hessian(x), GridConfig(4, 32))
    assert qw.q.shape == (8, 3, 32) and qw.dequantize().shape == (8, 80)


@pytest.mark.parametrize("cfg", [GridConfig(4, 32), GridConfig(4, 32, True)])
def test_mse_grid_never_rounds_worse_than_min_max(cfg):
    groups = to_groups(torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) ** 3, 32)  # heavy tails
    def error(scale, zero):
        q = encode(groups, scale[..., None], zero[..., None], cfg)
        return (decode(q, scale[..., None], zero[..., None]) - groups).abs().pow(2.4).sum(-1)
    plain, searched = error(*grid(groups, cfg)), error(*grid_mse(groups, cfg))
    assert torch.all(searched <= plain + 1e-6) and searched.sum() < plain.sum()
