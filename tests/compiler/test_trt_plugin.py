"""The llmc::PagedAttention TensorRT plugin's code paths without TensorRT: it says why it cannot register, and
against a stand-in for `tensorrt.plugin` it registers the plugin and builds the AOT kernel's launch from the
node's tensors (the kernel itself is tested in tests/kernels/test_triton_node_attention.py); the tensorrt
target's nodes carry plugin_namespace."""

import importlib.util
import sys
import types

import onnx
import pytest

from llmc.compiler import trt_plugin


class Desc:
    """A stand-in TensorDesc: a dtype and a shape."""

    def __init__(self, dtype: str, shape: tuple):
        self.dtype, self.shape_expr = types.SimpleNamespace(name=dtype), shape

    def like(self):
        return Desc(self.dtype.name, self.shape_expr)


def _fake_trtp():
    registry = {}
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc = Desc
    trtp.register = lambda plugin_id: lambda fn: registry.setdefault(("desc", plugin_id), fn)
    trtp.aot_impl = lambda plugin_id: lambda fn: registry.setdefault(("aot", plugin_id), fn)
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.cdiv = lambda a, b: -(-a // b)
    trtp.SymIntExprs = lambda n: [None] * n
    trtp.SymInt32 = int
    return trtp, registry


def test_without_tensorrt_the_plugin_says_why():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    assert "tensorrt" in trt_plugin.register() and not trt_plugin._registered


def test_registration_and_the_aot_launch(monkeypatch):
    trtp, registry = _fake_trtp()
    package = types.ModuleType("tensorrt")
    package.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", package)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    assert trt_plugin.register() is None
    assert {("desc", "llmc::PagedAttention"), ("aot", "llmc::PagedAttention")} == set(registry)

    t, s, q_max = 21, 3, 9  # tokens, sequences, the longest chunk
    inputs = [Desc("HALF", (t, 4 * 64)), Desc("HALF", (t, 2 * 64)), Desc("HALF", (t, 2 * 64)),
              Desc("HALF", (100, 16, 2, 64)), Desc("HALF", (100, 16, 2, 64)), Desc("INT64", (s, q_max)),
              Desc("INT64", (s, q_max)), Desc("INT32", (s, 5)), Desc("INT64", (3,)), Desc("INT64", (s, 2)),
              Desc("INT64", (t, 2)), Desc("FLOAT", (2048, 32)), Desc("FLOAT", (2048, 32))]
    out, k_rotated = registry[("desc", "llmc::PagedAttention")](*inputs, 0.125, 4, 2)
    assert out.shape_expr == (t, 256) and k_rotated.shape_expr == (t, 128) and out.dtype.name == "HALF"

    import triton
    seen = {}

    def fake_compile(source, options):
        seen.update(source=source, options=options)
        return types.SimpleNamespace(metadata=types.SimpleNamespace(name="node_kernel", num_warps=4, shared=4096),
                                     asm={"ptx": "// ptx"})
    monkeypatch.setattr(triton.compiler, "ASTSource", lambda **kw: kw)
    monkeypatch.setattr(triton, "compile", fake_compile)
    name, ptx, launch, scalars = registry[("aot", "llmc::PagedAttention")](*inputs, 0.125, 4, 2, [out, k_rotated], 0)
    assert (name, ptx) == ("node_kernel", "// ptx")
    signature = seen["source"]["signature"]
    assert signature["q_ptr"] == "*fp16" and signature["tables_ptr"] == "*i32" and signature["cos_ptr"] == "*fp32"
    assert signature["q_max"] == "i32" and list(signature).index("out_ptr") > list(signature).index("q_max")
    assert seen["source"]["constexprs"]["HEAD_DIM"] == 64 and seen["source"]["constexprs"]["BLOCK_SIZE"] == 16
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == (s, 4, 1) and launch.block_x == 128
    assert scalars == [q_max, 5]


def test_the_tensorrt_target_marks_attention_nodes_for_the_plugin(tmp_path, tiny_checkpoint):
    from llmc.compiler.emit_onnx import EmitOptions, emit_onnx
    from llmc.compiler.importer import import_checkpoint

    model = import_checkpoint(tiny_checkpoint, work_dir=tmp_path).model
    for weight_format, expected in (("qdq", [b"llmc"]), ("matmulnbits", [])):
        entry = emit_onnx(model, tmp_path / weight_format, options=EmitOptions(weight_format=weight_format))
        graph = onnx.load(str(tmp_path / weight_format / entry["graph"]), load_external_data=False).graph
        nodes = [n for n in graph.node if n.op_type == "PagedAttention"]
        namespaces = {a.s for n in nodes for a in n.attribute if a.name == "plugin_namespace"}
        assert sorted(namespaces) == expected, weight_format
