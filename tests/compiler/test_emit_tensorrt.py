"""The TensorRT target: its int4 QDQ step graph runs in onnxruntime and matches the fake-quant model; the engine
build itself needs TensorRT and an NVIDIA GPU and is skipped (visibly) elsewhere."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.compiler.importer import import_checkpoint
from llmc.compiler.pipeline import build
from llmc.compiler.spec import load_spec
from llmc.errors import BundleError
from llmc.runtime.llm import LLM
from tests.helpers import session_options, step_graph_vs_torch, write_yaml


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("trt")
    spec = load_spec(write_yaml(work / "model.yaml", name="tiny-trt", source=str(tiny_checkpoint), output="out",
                                targets=["tensorrt"], kv_cache={"block_size": 4},
                                quantization={"method": "rtn", "symmetric": True, "group_size": 32,
                                              "lm_head_bits": 4}))
    return load_bundle(build(spec))


def test_qdq_graph_uses_standard_int4_dequantize(trt_bundle):
    entry = trt_bundle.manifest.engines["tensorrt"]
    graph = onnx.load(str(trt_bundle.engine_dir("tensorrt") / entry.graph), load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    int4 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    # per layer: q/k/v stacked, o, gate/up stacked, down; plus the LM head
    assert len(int4) == 2 * 4 + 1 and entry.weight_format == "qdq"


def test_qdq_graph_matches_fake_quant_in_onnxruntime(trt_bundle, tiny_checkpoint, tmp_path):
    ir = import_checkpoint(tiny_checkpoint, work_dir=tmp_path)
    from llmc.compiler.pipeline import build_passes
    from llmc.passes.base import run_passes

    spec = load_spec(write_yaml(tmp_path / "m.yaml", name="m", source=str(tiny_checkpoint), targets=["tensorrt"],
                                quantization={"method": "rtn", "symmetric": True, "group_size": 32,
                                              "lm_head_bits": 4}))
    run_passes(ir, build_passes(spec, ir))  # the same fake-quant weights the bundle was built from
    path = trt_bundle.engine_dir("tensorrt") / trt_bundle.manifest.engines["tensorrt"].graph
    exact = session_options()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # plain DequantizeLinear + MatMul
    logits, expected = step_graph_vs_torch(path, ir.model, options=exact)
    assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_engine_state_is_recorded(trt_bundle):
    entry = trt_bundle.manifest.engines["tensorrt"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert entry.plan is None and "not installed" in entry.skipped
        assert not (trt_bundle.engine_dir("tensorrt") / "model.plan").exists()
        pytest.skip("TensorRT is not installed: the tensorrt engine build was not run (ONNX verified above)")
    assert (trt_bundle.engine_dir("tensorrt") / entry.plan).stat().st_size > 0


def test_runtime_refuses_a_bundle_without_an_onnxruntime_engine(trt_bundle):
    with pytest.raises(BundleError, match="no onnxruntime engine"):
        LLM(trt_bundle.path)


def test_optimization_profile_takes_the_graphs_pool_shape(trt_bundle):
    """The TensorRT profile's pool shapes are ModelGeometry.pool_shape, and they fit the QDQ graph's pool inputs
    (their static dims equal, their symbolic ones ranged)."""
    from llmc.compiler.emit_tensorrt import _profile_shapes

    geo, block = trt_bundle.geometry, trt_bundle.block_size
    entry = trt_bundle.manifest.engines["tensorrt"]
    graph = onnx.load(str(trt_bundle.engine_dir("tensorrt") / entry.graph), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    shapes = _profile_shapes(geo, block, max_tokens=64, max_seqs=4, max_blocks=32)
    pools = [name for name in shapes if "_pool_" in name]
    assert len(pools) == 2 * geo.num_layers
    for name in pools:
        assert shapes[name] == tuple(geo.pool_shape(n, block) for n in (1, 32, 32))
        for low in shapes[name]:
            assert len(low) == len(inputs[name])
            assert all(dim == static for dim, static in zip(low, inputs[name]) if isinstance(static, int) and static)
    assert all(name in inputs for name in shapes)


def test_a_plan_loads_only_with_its_tensorrt_and_gpu(trt_bundle, tmp_path):
    """Engine files record the TensorRT version and compute capability they were built with; any other is refused
    before TensorRT sees the plan, with the rebuild command."""
    from llmc.artifacts.tensorrt_plan import check_plan
    from tests.helpers import edit_manifest

    with pytest.raises(BundleError, match="TensorRT engine was not built .*rebuild it on this server with `llmc build"):
        check_plan(trt_bundle, "10.7.0", "9.0")
    copy = edit_manifest(trt_bundle.path, tmp_path / "built", lambda m: m["engines"]["tensorrt"].update(
        plan="model.plan", skipped=None, tensorrt="10.7.0", compute_capability="9.0"))
    (copy / "engines" / "tensorrt" / "model.plan").write_bytes(b"serialized engine")
    built = load_bundle(copy, verify=False)
    assert check_plan(built, "10.7.0", "9.0") == copy / "engines" / "tensorrt" / "model.plan"
    with pytest.raises(BundleError, match="built by TensorRT 10.7.0 and this server has TensorRT 10.8.1.*llmc build"):
        check_plan(built, "10.8.1", "9.0")
    with pytest.raises(BundleError, match="compute capability 9.0 and this one is 8.9.*llmc build"):
        check_plan(built, "10.7.0", "8.9")
    with pytest.raises(BundleError, match="TensorRT is not installed here"):
        check_plan(built, None, "9.0")
