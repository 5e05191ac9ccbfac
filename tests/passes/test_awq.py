"""AWQ: the scale folding keeps the float function; the search never does worse than its identity point."""

import numpy as np
import torch

from llmc.compiler.importer import import_checkpoint
from llmc.kernels.awq import apply_clip, scales_for, search_clip, search_scale
from llmc.kernels.quant import GridConfig, fake_quantize
from llmc.passes.layerwise import LayerwiseRunner, capture_inputs
from llmc.passes.quant_awq import QuantAWQ
from llmc.passes.quant_common import LINEARS


def _runner(tiny_checkpoint, tmp_path, seqs=4, seq_len=32):
    ir = import_checkpoint(tiny_checkpoint, work_dir=tmp_path)
    windows = torch.randint(0, ir.geometry.vocab_size, (seqs, seq_len), generator=torch.Generator().manual_seed(0))
    return ir, LayerwiseRunner(ir.model, windows)


def test_scales_are_normalised():
    s = scales_for(torch.rand(64) + 0.1, torch.rand(64) + 0.1, 0.5, duo=True)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0)) and (s > 0).all()
    assert torch.allclose(scales_for(torch.rand(8), torch.rand(8), 0.0, duo=False), torch.ones(8))


def test_scale_folding_keeps_the_float_layer(tiny_checkpoint, tmp_path):
    ir, runner = _runner(tiny_checkpoint, tmp_path)
    x = runner.embed()
    layer = ir.model.layers[0]
    with capture_inputs(layer, LINEARS) as feats:
        before = runner.layer(layer, x)
    ratios = QuantAWQ(GridConfig(4, 32), False, runner.windows)._scale_groups(runner, layer, feats)
    assert set(ratios) >= {"qkv", "gate_up", "down"} and "v_o" not in ratios  # GQA: v -> o is not scaled
    assert any(r > 0 for r in ratios.values())  # the norms and weights really changed
    torch.testing.assert_close(runner.layer(layer, x), before, rtol=1e-4, atol=1e-5)


def test_search_is_never_worse_than_plain_rtn(tiny_checkpoint, tmp_path):
    """With the paper's scaling, exponent 0 is s = 1 (plain RTN): the chosen point can only be better."""
    ir, runner = _runner(tiny_checkpoint, tmp_path)
    layer = ir.model.layers[0]
    h = runner.norm_inputs(layer, runner.embed())
    cfg = GridConfig(4, 32)
    linears = [layer.q_proj, layer.k_proj, layer.v_proj]
    reference = runner.attention(layer, h)
    originals = [lin.weight.data.clone() for lin in linears]
    for lin in linears:
        lin.weight.data = fake_quantize(lin.weight.data, cfg)
    rtn_err = float((runner.attention(layer, h) - reference).pow(2).mean())
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    s, ratio, err = search_scale(linears, h.abs().mean(0), lambda: runner.attention(layer, h), cfg, 20, duo=False)
    assert err <= rtn_err * (1 + 1e-6) and 0 <= ratio < 1 and s.shape == (h.shape[1],)
    assert all(torch.equal(lin.weight.data, w) for lin, w in zip(linears, originals))  # restored


def test_clip_search_lowers_group_output_error():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g)
    w[0, 3] = 12.0  # an outlier that stretches its group's grid
    x = torch.randn(256, 64, generator=g)
    cfg = GridConfig(4, 32)
    max_val = search_clip(w, x, cfg)
    assert max_val.shape == (32, 2) and max_val[0, 0] < 12.0
    clipped = apply_clip(w, max_val, 32)
    err = lambda q: float((x @ (w - q).T).pow(2).mean())  # noqa: E731
    assert err(fake_quantize(clipped, cfg)) <= err(fake_quantize(w, cfg))
    np.testing.assert_array_less(clipped.abs().numpy(), w.abs().numpy() + 1e-6)
