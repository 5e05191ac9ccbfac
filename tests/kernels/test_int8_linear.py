"""llmc.Int8Linear: the AMX kernel (natively where the CPU has AMX, on a scalar model of the tiles
everywhere), the AVX-512 VNNI kernel (where the CPU has VNNI + BF16, AMX or not) and the ONNX function
body against numpy."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmc.compiler import onnx_int8_linear as il
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu
from tests.helpers import int8_backend_env, kernel_options

needs_int8 = pytest.mark.skipif(not fused_cpu.int8_backend(), reason="this CPU has neither AMX nor AVX-512 VNNI + BF16")
needs_vnni = pytest.mark.skipif(not fused_cpu.avx512_vnni_available(), reason="this CPU has no AVX-512 VNNI + BF16")
NATIVE = [pytest.param("native", marks=needs_int8), pytest.param("native-vnni", marks=needs_vnni)]
KERNELS = pytest.mark.parametrize("kernels", [*NATIVE, "emulated-amx", "function-body"])


def _graph_session(g: GraphBuilder, in_features: int, outputs: list[str], kernels: str) -> ort.InferenceSession:
    """A session over the nodes of g, with input x [M, in_features] and the named float outputs."""
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", in_features])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["M", None]) for o in outputs],
                              g.initializers)
    model = helper.make_model(graph, functions=[il.build_function(op) for op in il.FUNCTIONS],
                              opset_imports=[helper.make_opsetid("", il.OPSET), helper.make_opsetid(il.DOMAIN, 1)])
    with int8_backend_env(kernels):
        return ort.InferenceSession(model.SerializeToString(), kernel_options(kernels),
                                    providers=["CPUExecutionProvider"])


def _session(weight: np.ndarray, outliers, kernels: str, swiglu: bool = False) -> ort.InferenceSession:
    g = GraphBuilder()
    y = il.int8_linear(g, "x", "lin", weight, outliers, swiglu)
    return _graph_session(g, 2 * weight.shape[1] if swiglu else weight.shape[1], [y], kernels)


@KERNELS
@pytest.mark.parametrize("n,k,num_outliers", [(96, 64, 0), (37, 96, 32), (960, 576, 64), (50, 224, 96)])
def test_int8_linear_matches_numpy(kernels, n, k, num_outliers):
    rng = np.random.default_rng(n)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    outliers = rng.choice(k, num_outliers, replace=False)
    session = _session(weight, outliers, kernels)
    channels = il.channel_order(k, outliers)
    codes, scale, w_outlier = il.quantize_weight(weight, channels, num_outliers)
    for m in (1, 3, 16, 17, 33, 70):  # one or two row tiles per work item, partly filled
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, outliers] *= 100.0  # the outlier channels carry large activations
        x[0] = 0.0  # an all-zero row (scale 1)
        y = session.run(None, {"x": x})[0]
        ref = il.reference(x, codes, scale, w_outlier, channels)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        exact = x @ weight.T  # int8 weights and activations: about 1% of the output's range
        assert np.abs(y - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("kernels", [*NATIVE, "emulated-amx"])
@pytest.mark.parametrize("glu", [False, True])
def test_outputs_past_the_streaming_size_match_numpy(kernels, glu):
    """Outputs of >= 2 MiB are written with non-temporal stores (kStreamBytes): the same values."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((1024, 64)) * 0.1).astype(np.float32)
    g = GraphBuilder()
    session = _graph_session(g, 64, [il.int8_linear(g, "x", "lin", weight, [], glu=glu)], kernels)
    codes, scale, w_outlier = il.quantize_weight(weight, np.arange(64), 0)
    x = rng.standard_normal((1100, 64)).astype(np.float32)  # [1100, 1024] float: 4.3 MiB (GLU's half: 2.1)
    ref = il.reference(x, codes, scale, w_outlier, np.arange(64))
    ref = il.swiglu(ref) if glu else ref
    np.testing.assert_allclose(session.run(None, {"x": x})[0], ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_outlier_channels_keep_the_other_channels_precise():
    """With the large channels out of the int8 range, the error is that of the small ones."""
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[:, [3, 100]] *= 300.0
    exact = x @ weight.T
    errors = [np.abs(_session(weight, outliers, "function-body").run(None, {"x": x})[0] - exact).max()
              for outliers in ([], np.r_[3, 100, 4:66])]
    assert errors[1] < errors[0] / 5  # what is left: bf16 rounding of the large channels


@pytest.mark.parametrize("kernels", [*NATIVE, "emulated-amx"])
def test_a_tokens_result_does_not_depend_on_the_other_tokens(kernels):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    session = _session(weight, np.arange(32), kernels)
    x = rng.standard_normal((20, 96)).astype(np.float32)
    crowded = np.concatenate([x, 100 * rng.standard_normal((20, 96)).astype(np.float32)])  # outlier tokens
    np.testing.assert_array_equal(session.run(None, {"x": crowded})[0][:20], session.run(None, {"x": x})[0])


def test_bf16_round_is_round_to_nearest_even():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -2.5e-3, 0.0], np.float32)
    expected = np.array([1.0, 1.0, 1.0 + 2**-6, 1.0, -2.5e-3, 0.0], np.float32)
    np.testing.assert_array_equal(il.bf16_round(values)[[0, 1, 2, 3, 5]], expected[[0, 1, 2, 3, 5]])
    assert abs(il.bf16_round(values)[4] / values[4] - 1) < 2**-8




@KERNELS
@pytest.mark.parametrize("k,num_outliers", [(128, 0), (160, 32), (224, 96)])
def test_swiglu_variant_is_the_op_over_silu_gate_times_up(kernels, k, num_outliers):
    """Int8LinearSwiGLU(gate | up) = Int8Linear(silu(gate) * up), its activation computed as it quantizes."""
    rng = np.random.default_rng(k)
    weight = (rng.standard_normal((48, k)) * 0.05).astype(np.float32)
    outliers = rng.choice(k, num_outliers, replace=False)
    channels = il.channel_order(k, outliers)
    codes, scale, w_outlier = il.quantize_weight(weight, channels, num_outliers)
    session = _session(weight, outliers, kernels, swiglu=True)
    for m in (1, 17, 40):
        gate_up = (3 * rng.standard_normal((m, 2 * k))).astype(np.float32)  # gates on both sides of 0, past |3|
        y = session.run(None, {"x": gate_up})[0]
        ref = il.reference(il.swiglu(gate_up), codes, scale, w_outlier, channels)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@KERNELS
@pytest.mark.parametrize("i,k,num_outliers", [(48, 128, 0), (64, 160, 32), (16, 224, 96)])
def test_glu_variant_is_silu_gate_times_up_of_the_op(kernels, i, k, num_outliers):
    """Int8LinearGLU over gate | up weights [2I, K] = silu(gate) * up of Int8Linear's [M, 2I] output."""
    rng = np.random.default_rng(i + k)
    weight = (rng.standard_normal((2 * i, k)) * 0.3).astype(np.float32)  # gates on both sides of 0, past |3|
    outliers = rng.choice(k, num_outliers, replace=False)
    channels = il.channel_order(k, outliers)
    codes, scale, w_outlier = il.quantize_weight(weight, channels, num_outliers)
    g = GraphBuilder()
    session = _graph_session(g, k, [il.int8_linear(g, "x", "gate_up", weight, outliers, glu=True)], kernels)
    for m in (1, 17, 40):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = session.run(None, {"x": x})[0]
        ref = il.swiglu(il.reference(x, codes, scale, w_outlier, channels))
        assert y.shape == (m, i)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@KERNELS
def test_split3_variant_writes_the_three_linears_outputs(kernels):
    """Int8LinearSplit3 over stacked q/k/v weights: each output is its columns of one Int8Linear."""
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((96 + 32 + 48, 128)) * 0.05).astype(np.float32)
    outliers = rng.choice(128, 64, replace=False)
    g = GraphBuilder()
    outs = il.int8_linear(g, "x", "qkv", weight, outliers, splits=[96, 32, 48])
    session = _graph_session(g, 128, outs, kernels)
    channels = il.channel_order(128, outliers)
    codes, scale, w_outlier = il.quantize_weight(weight, channels, 64)
    for m in (1, 20, 45):
        x = rng.standard_normal((m, 128)).astype(np.float32)
        ref = il.reference(x, codes, scale, w_outlier, channels)
        got = session.run(None, {"x": x})
        assert [y.shape for y in got] == [(m, 96), (m, 32), (m, 48)]
        np.testing.assert_allclose(np.concatenate(got, axis=1), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
