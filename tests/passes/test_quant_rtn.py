"""RTN int4: the quantization math, and the MatMulNBits engine against the torch fake-quant reference."""

import numpy as np
import onnx
import pytest
import torch

from llmc.compiler.emit_onnx import EmitOptions, emit_onnx
from llmc.compiler.importer import import_checkpoint
from llmc.kernels.quant import GridConfig, fake_quantize, quantize_rtn
from llmc.passes.base import run_passes
from llmc.passes.quant_rtn import QuantRTN
from tests.helpers import step_graph_vs_torch


@pytest.mark.parametrize("symmetric,zero_point", [(False, "int"), (False, "float"), (True, "int")])
@pytest.mark.parametrize("k,block", [(64, 32), (576, 128), (100, 64), (96, 32)])
def test_rtn_error_is_at_most_half_a_step(symmetric, zero_point, k, block):
    w = np.random.default_rng(0).normal(size=(8, k)).astype(np.float32)
    qw = quantize_rtn(w, GridConfig(4, block, symmetric, zero_point))
    deq = qw.dequantize()
    assert deq.shape == w.shape and qw.q.max() <= 15
    step = np.repeat(qw.scale, block, axis=1)[:, :k]
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)


def test_rtn_reproduces_a_q4_1_grid_exactly():
    """Weights already on a min + d * q grid (as Q4_1 stores them) survive group-32 RTN unchanged."""
    rng = np.random.default_rng(1)
    d, m = rng.uniform(0.01, 0.1, size=(4, 2, 1)), rng.uniform(-1, 0, size=(4, 2, 1))
    codes = rng.integers(0, 16, size=(4, 2, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # each block spans its full range, as Q4_1's quantizer makes it
    w = (m + d * codes).reshape(4, 64).astype(np.float32)
    assert np.abs(quantize_rtn(w, GridConfig(4, 32, symmetric=False, zero_point="float")).dequantize() - w).max() < 1e-6


@pytest.mark.parametrize("cfg", [GridConfig(4, 32), GridConfig(4, 128, True), GridConfig(8, 64),
                                 GridConfig(4, 64, False, "float")])
def test_fake_quantize_equals_the_codes_dequantized(cfg):
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fake_quantize(w, cfg), torch.from_numpy(quantize_rtn(w, cfg).dequantize()), atol=1e-6)


def test_packing_is_low_nibble_first():
    qw = quantize_rtn(np.arange(64, dtype=np.float32)[None], GridConfig(4, 32))
    packed = qw.packed()
    assert packed.shape == (1, 2, 16)
    assert packed[0, 0, 0] == qw.q[0, 0, 0] | (qw.q[0, 0, 1] << 4)


@pytest.mark.parametrize("cfg", [GridConfig(4, 128), GridConfig(4, 128, False, "float"), GridConfig(4, 64, True),
                                 GridConfig(8, 128)])
def test_split_blocks_is_the_same_weight(cfg):
    """A group split into smaller kernel blocks (for int8 activation blocks) dequantizes to the same weight."""
    w = np.random.default_rng(3).normal(size=(6, 200)).astype(np.float32)
    qw = quantize_rtn(w, cfg)
    split = qw.split_blocks(16)
    assert split.block_size == 16 and split.q.shape == (6, 13, 16) and split.scale.shape == (6, 13)
    assert np.array_equal(split.dequantize(), qw.dequantize())
    if cfg.bits == 4:
        assert split.packed().shape == (6, 13, 8)
    if qw.zero is not None and qw.zero.dtype == np.uint8 and cfg.bits == 4:
        assert split.packed_zeros().shape == (6 * 7,)  # two 4-bit zero points per byte, rows padded to bytes
    assert qw.split_blocks(cfg.group_size) is qw


@pytest.mark.parametrize("accuracy_level,tol,symmetric,zero_point,activation_block", [
    (0, 1e-4, False, "int", None), (0, 1e-4, False, "float", None), (0, 1e-4, True, "int", None),
    (4, 0.05, False, "int", None), (4, 0.05, False, "int", 16), (4, 0.05, True, "int", 16)])
def test_int4_engine_matches_fake_quant_reference(tiny_checkpoint, tmp_path, caplog, accuracy_level, tol, symmetric,
                                                  zero_point, activation_block):
    ir = import_checkpoint(tiny_checkpoint, work_dir=tmp_path)
    reference_fp32 = ir.model.lm_head_weight().detach().clone()
    records = run_passes(ir, [QuantRTN(GridConfig(4, 32, symmetric, zero_point), GridConfig(8, 32, symmetric))])
    assert records[0]["num_quantized"] == 2 * 7 + 1 and records[0]["mean_rel_weight_error"] > 0
    assert not torch.equal(ir.model.lm_head_weight(), reference_fp32)  # the torch model is now fake-quant
    entry = emit_onnx(ir.model, tmp_path / "engine", ir.quantized,
                      EmitOptions(accuracy_level=accuracy_level, activation_block_size=activation_block))
    slow_head = "no fp32 8-bit kernel" in caplog.text  # the 8-bit head at level 0 dequantizes every step
    assert slow_head == (accuracy_level == 0)
    graph = onnx.load(str(tmp_path / "engine" / entry["graph"]), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {activation_block or 32}
    logits, expected = step_graph_vs_torch(tmp_path / "engine" / entry["graph"], ir.model)
    assert np.abs(logits - expected).max() <= tol * max(1.0, np.abs(expected).max())
