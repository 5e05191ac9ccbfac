"""llmc.Int8Linear: the AMX kernel and the ONNX function body against numpy."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmc.compiler import onnx_int8_linear as il
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu

needs_amx = pytest.mark.skipif(not fused_cpu.amx_int8_available(), reason="this CPU has no AMX int8 tiles")


def _session(weight: np.ndarray, with_kernels: bool) -> ort.InferenceSession:
    g = GraphBuilder()
    g.nodes.append(helper.make_node("Identity", [il.int8_linear(g, "x", "lin", weight)], ["y"]))
    n, k = weight.shape
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], g.initializers)
    model = helper.make_model(graph, functions=[il.build_function()],
                              opset_imports=[helper.make_opsetid("", il.OPSET), helper.make_opsetid(il.DOMAIN, 1)])
    options = ort.SessionOptions()
    if with_kernels:
        assert fused_cpu.register_fused_kernels(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_kernels", [pytest.param(True, marks=needs_amx), False], ids=["amx", "function-body"])
@pytest.mark.parametrize("n,k", [(96, 64), (37, 128), (960, 576)])
def test_int8_linear_matches_numpy(with_kernels, n, k):
    rng = np.random.default_rng(n)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    codes, scale = il.quantize_weight(weight)
    session = _session(weight, with_kernels)
    for m in (1, 3, 16, 17, 33, 70):  # one or two row tiles per work item, partly filled
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0] = 0.0  # an all-zero row (scale 1)
        y = session.run(None, {"x": x})[0]
        ref = il.reference(x, codes, scale)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        exact = x @ weight.T  # int8 weights and activations: about 1% of the output's range
        assert np.abs(y - exact).max() <= 0.03 * np.abs(exact).max()


def test_a_tokens_result_does_not_depend_on_the_other_tokens():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)
    session = _session(weight, fused_cpu.amx_int8_available())
    x = rng.standard_normal((20, 64)).astype(np.float32)
    crowded = np.concatenate([x, 100 * rng.standard_normal((20, 64)).astype(np.float32)])  # outlier tokens
    np.testing.assert_array_equal(session.run(None, {"x": crowded})[0][:20], session.run(None, {"x": x})[0])


@pytest.mark.parametrize("symmetric,group", [(False, 64), (False, 128), (True, 64)])
def test_int4_codes_are_held_exactly(symmetric, group):
    """exact_codes: int4 groups of 64 or more become the op's int8 weight with no second rounding."""
    import torch

    from llmc.kernels.quant import GridConfig, quantize_rtn

    weight = torch.randn(48, 256) * 0.05
    q = quantize_rtn(weight, GridConfig(4, group, symmetric))
    codes, scale = il.exact_codes(q)
    rebuilt = codes.reshape(48, -1, il.BLOCK).astype(np.float32) * scale[..., None]
    np.testing.assert_array_equal(rebuilt.reshape(48, 256), q.dequantize())
    assert np.abs(codes).max() <= 15


def test_int4_groups_smaller_than_a_block_are_not_exact():
    import torch

    from llmc.kernels.quant import GridConfig, quantize_rtn

    assert il.exact_codes(quantize_rtn(torch.randn(16, 128), GridConfig(4, 32, False))) is None
