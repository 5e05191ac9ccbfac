"""llmc.Int8Linear: the AMX kernel and the ONNX function body against numpy, and the int8 prefill
graph of a bundle: used for steps of many tokens where AMX runs, the main graph elsewhere."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmc.compiler import onnx_int8_linear as il
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels import fused_cpu
from llmc.runtime import engine_ort
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import write_yaml

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
    for m in (1, 16, 33, 70):
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


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_checkpoint):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("int8-build")
    return build(load_spec(write_yaml(work / "model.yaml", name="tiny-int8", source=str(tiny_checkpoint),
                                      kv_cache={"block_size": 4}, int8_prefill=True, output="out")))


@needs_amx
def test_long_steps_run_the_int8_graph_and_agree_with_fp32(int8_bundle, tiny_bundle):
    prompt = list(range(3, 83))  # 80 tokens: one prefill step of the int8 graph
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5)
    llm = LLM(int8_bundle, max_num_batched_tokens=256)
    out = llm.generate([prompt], params)[0]
    assert llm.engine.path_counts["int8_amx"] == [1, 80] and llm.engine.path_counts["main"][0] == 7
    assert "int8 AMX" in llm.engine.gemm_path
    ref = LLM(tiny_bundle, max_num_batched_tokens=256).generate([prompt], params)[0]
    first, ref_first = dict(out.logprobs[0]), dict(ref.logprobs[0])  # the prefill step's distribution
    assert out.token_ids[0] == ref.token_ids[0]
    shared = set(first) & set(ref_first)
    assert len(shared) >= 4 and max(abs(first[t] - ref_first[t]) for t in shared) < 0.05


def test_without_amx_the_bundle_runs_the_main_graph(int8_bundle, tiny_bundle, monkeypatch):
    monkeypatch.setattr(engine_ort, "amx_int8_available", lambda: False)
    llm = LLM(int8_bundle)
    out = llm.generate([list(range(3, 83))], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert llm.engine.path_counts["int8_amx"] == [0, 0] and "main graph" in llm.engine.gemm_path
    ref = LLM(tiny_bundle).generate([list(range(3, 83))], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == ref.token_ids  # the same fp32 graph as the bundle without the int8 one
