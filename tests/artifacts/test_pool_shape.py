"""One KV pool shape (ModelGeometry.pool_shape): the runtime's pools, the torch IR's, and every emitted
graph's pool inputs agree with it (the TensorRT profile: tests/compiler/test_emit_tensorrt.py)."""

import onnx
import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.compiler.importer import import_checkpoint
from llmc.runtime.kv_pool import KVPool
from tests.helpers import write_yaml


def _pool_inputs(path) -> dict[str, tuple]:
    """Each pool input's dims: symbolic ones by name, static ones by value."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)
            for i in graph.input if "_pool_" in i.name}


@pytest.fixture(scope="module")
def int4_int8_bundle(tmp_path_factory, tiny_checkpoint):
    """An int4 bundle with an int8 graph: model.onnx (MatMulNBits), decode.onnx and prefill.onnx."""
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("pool-shape")
    (work / "calibration.txt").write_text("the pool shape is one shape for every graph " * 40)
    return load_bundle(build(load_spec(write_yaml(
        work / "model.yaml", name="tiny-pools", source=str(tiny_checkpoint), output="out", kv_cache={"block_size": 4},
        quantization={"method": "rtn", "group_size": 32}, int8_prefill=True,
        calibration={"texts": ["calibration.txt"], "n_samples": 2, "seq_len": 32}))))


def test_every_graph_takes_pools_of_the_one_shape(int4_int8_bundle):
    bundle = int4_int8_bundle
    entry = bundle.manifest.engines["onnxruntime"]
    graphs = [entry.graph, entry.decode.graph, entry.prefill.graph]
    expected = bundle.geometry.pool_shape("num_blocks", "block_size")
    for graph in graphs:
        inputs = _pool_inputs(bundle.engine_dir("onnxruntime") / graph)
        assert len(inputs) == 2 * bundle.geometry.num_layers, graph
        assert set(inputs.values()) == {expected}, graph


def test_runtime_and_ir_pools_take_the_one_shape(int4_int8_bundle, tiny_checkpoint, tmp_path):
    geo = int4_int8_bundle.geometry
    pool = KVPool(geo, num_blocks=5, block_size=4)
    assert pool.keys.shape == pool.values.shape == (geo.num_layers, *geo.pool_shape(5, 4))
    ir = import_checkpoint(tiny_checkpoint, work_dir=tmp_path)
    assert {tuple(k.shape) for k, _ in ir.model.new_kv_cache(5, 4)} == {geo.pool_shape(5, 4)}
