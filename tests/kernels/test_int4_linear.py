"""llmc.Int4Linear: the AVX-512 VNNI kernel (where the CPU has it) and the ONNX function body against numpy."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from llmc.compiler import onnx_int4_linear as i4
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu
from llmc.kernels.quant import GridConfig, quantize_rtn
from tests.helpers import ort_options

needs_int4 = pytest.mark.skipif(not fused_cpu.int4_available(), reason="this CPU has no AVX-512 VNNI")
KERNELS = pytest.mark.parametrize("kernels", [pytest.param("native", marks=needs_int4), "function-body"])


def _session(qw, kernels: str, glu: bool = False) -> ort.InferenceSession:
    g = GraphBuilder()
    y = i4.int4_linear(g, "x", "lin", qw, glu=glu)
    graph = helper.make_graph(g.nodes, "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", qw.in_features])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", None])], g.initializers)
    model = helper.make_model(graph, functions=[i4.build_function(op) for op in i4.FUNCTIONS],
                              opset_imports=[helper.make_opsetid("", i4.OPSET), helper.make_opsetid(i4.DOMAIN, 1)])
    return ort.InferenceSession(model.SerializeToString(), ort_options(kernels == "native"),
                                providers=["CPUExecutionProvider"])


def _weight(rng, n: int, k: int, cfg: GridConfig):
    return quantize_rtn((rng.standard_normal((n, k)) * 0.05).astype(np.float32), cfg)


@KERNELS
@pytest.mark.parametrize("n,k,cfg", [
    (96, 64, GridConfig(4, 32, False)),
    (37, 96, GridConfig(4, 32, True)),           # a partial tile of columns; symmetric (zero 8)
    (960, 576, GridConfig(4, 128, False)),       # SmolLM2's q|k|v: a partial last group of 64
    (50, 224, GridConfig(4, 64, False)),
])
def test_int4_linear_matches_numpy(kernels, n, k, cfg):
    rng = np.random.default_rng(n)
    qw = _weight(rng, n, k, cfg)
    session = _session(qw, kernels)
    codes, scale, zero = i4.op_inputs(qw)
    for m in (1, 2, 3, 4, 5, 9, 33):  # row passes of 4 and every remainder
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, :8] *= 50.0  # a few large channels: their blocks get their own scale
        x[0, 32:64] = 0.0  # a block of zeros (scale 1)
        y = session.run(None, {"x": x})[0]
        ref = i4.reference(x, codes, scale, zero, qw.block_size)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        exact = x @ qw.dequantize().T  # int8 activation blocks: about 1% of the output's range
        assert np.abs(y - exact).max() <= 0.03 * np.abs(exact).max()


@KERNELS
def test_glu_variant_is_silu_gate_times_up(kernels):
    rng = np.random.default_rng(7)
    i, k = 96, 128
    qw = _weight(rng, 2 * i, k, GridConfig(4, 64, False))
    codes, scale, zero = i4.op_inputs(qw)
    session = _session(qw, kernels, glu=True)
    for m in (1, 6):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = session.run(None, {"x": x})[0]
        assert y.shape == (m, i)
        plain = i4.reference(x, codes, scale, zero, qw.block_size)
        gate, up = plain[:, :i], plain[:, i:]
        expected = torch.nn.functional.silu(torch.from_numpy(gate)).numpy() * up
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_op_inputs_round_trip_the_codes():
    rng = np.random.default_rng(3)
    qw = _weight(rng, 40, 160, GridConfig(4, 32, False))
    codes, scale, zero = i4.op_inputs(qw)
    assert codes.shape == (40, 80) and scale.dtype == np.float16 and zero.dtype == np.uint8
    w = i4.dequantize(codes, scale, zero, qw.block_size)
    # float16 scales and offsets: the weights within float16's rounding of the float32 grid
    np.testing.assert_allclose(w, qw.dequantize(), rtol=0, atol=2e-3 * np.abs(qw.dequantize()).max())


def test_supports_only_integer_zero_points_and_whole_blocks():
    rng = np.random.default_rng(4)
    assert i4.supports(_weight(rng, 16, 64, GridConfig(4, 32, False)))
    assert not i4.supports(_weight(rng, 16, 64, GridConfig(4, 32, False, "float")))
    assert not i4.supports(_weight(rng, 16, 64, GridConfig(4, 16, False)))
    assert not i4.supports(_weight(rng, 16, 64, GridConfig(8, 32, False)))
