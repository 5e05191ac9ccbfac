"""The llmc::PagedAttention TensorRT plugin's code paths without TensorRT: it says why it cannot register, and
against a stand-in for `tensorrt.plugin` it registers the plugin and builds the AOT kernel's launch from the
node's tensors (the kernel itself is tested in tests/kernels/test_triton_node_attention.py); the tensorrt
target's nodes carry plugin_namespace."""

import importlib.util
import inspect
import sys
import types
import typing

import onnx
import pytest

from llmc.compiler import trt_plugin


class Dim:
    """A stand-in ShapeExpr: like tensorrt.plugin's, it has no int(), only constant_value()."""

    is_fake, is_constant = False, True

    def __init__(self, value: int):
        self.value = value

    def constant_value(self) -> int:
        return self.value


class Desc:
    """A stand-in TensorDesc: a dtype and a shape of Dims."""

    def __init__(self, dtype: str, shape: tuple):
        self.dtype, self.shape_expr = types.SimpleNamespace(name=dtype), [Dim(d) for d in shape]

    def like(self):
        return Desc(self.dtype.name, [d.value for d in self.shape_expr])


class KernelLaunchParams(types.SimpleNamespace):
    pass


class SymIntExprs(list):
    def __init__(self, length: int):
        super().__init__([None] * length)


ATTRIBUTE_TYPES = (int, float, bytes, bool, str)


def _strict_trtp():
    """A stand-in for `tensorrt.plugin` that checks the decorated functions as tensorrt 11.4 does
    (tensorrt/plugin/_validate.py): annotations read with inspect.signature (real classes, not strings), tensors
    first, attributes of the serializable types, a return annotation on both functions, and aot_impl's arguments
    the tensors, then registered attributes (same types), then outputs and tactic."""
    registry, attributes = {}, {}

    def register(plugin_id):
        def decorate(fn):
            sig = inspect.signature(fn)
            if sig.return_annotation is inspect.Parameter.empty:
                raise ValueError("No return annotation found for register function")
            if typing.get_origin(sig.return_annotation) is not tuple or not all(
                    inspect.isclass(a) and issubclass(a, Desc) for a in typing.get_args(sig.return_annotation)):
                raise ValueError(f"Return types can only be TensorDesc or Tuple[TensorDesc]: {sig.return_annotation}")
            tensors, attrs = [], {}
            for name, param in sig.parameters.items():
                if inspect.isclass(param.annotation) and issubclass(param.annotation, Desc):
                    if attrs:
                        raise ValueError("TensorDescs args and attribute args cannot be interspersed")
                    tensors.append(name)
                elif param.annotation in ATTRIBUTE_TYPES:
                    attrs[name] = param.annotation
                else:
                    raise ValueError(f"Attribute '{name}' of type {param.annotation!r} is not a supported type")
            attributes[plugin_id] = tensors, attrs
            registry["desc", plugin_id] = fn
            return fn
        return decorate

    def aot_impl(plugin_id):
        def decorate(fn):
            tensors, attrs = attributes[plugin_id]
            sig = inspect.signature(fn)
            names = list(sig.parameters)
            used = [n for n in attrs if n in names]
            if names != tensors + used + ["outputs", "tactic"]:
                raise ValueError(f"Signature of the aot_impl function {sig} does not match the expected schema")
            for name in used:
                annotation = sig.parameters[name].annotation
                if annotation is not inspect.Parameter.empty and annotation != attrs[name]:
                    raise ValueError(f"Attribute '{name}' has a type annotation different from the registered one")
            returned = typing.get_args(sig.return_annotation)
            if (sig.return_annotation is inspect.Parameter.empty or len(returned) != 4
                    or not all(set(typing.get_args(a) or (a,)) <= {str, bytes} for a in returned[:2])
                    or not issubclass(returned[2], KernelLaunchParams) or not issubclass(returned[3], list)):
                raise ValueError(f"aot_impl's return annotation must be (str | bytes, str | bytes, "
                                 f"KernelLaunchParams, SymIntExprs), not {sig.return_annotation}")
            registry["aot", plugin_id] = fn
            return fn
        return decorate

    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs = Desc, KernelLaunchParams, SymIntExprs
    trtp.register, trtp.aot_impl = register, aot_impl
    trtp.cdiv = lambda a, b: Dim(-(-a.value // b))
    trtp.SymInt32 = lambda value: value
    return trtp, registry


def test_without_tensorrt_the_plugin_says_why():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    assert "tensorrt" in trt_plugin.register() and not trt_plugin._registered


def test_registration_and_the_aot_launch(monkeypatch):
    trtp, registry = _strict_trtp()
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
    assert [d.value for d in out.shape_expr] == [t, 256] and [d.value for d in k_rotated.shape_expr] == [t, 128]
    assert out.dtype.name == "HALF"

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
    assert (launch.grid_x.value, launch.grid_y, launch.grid_z.value) == (s, 4, 1) and launch.block_x == 128
    assert [d.value for d in scalars] == [q_max, 5]


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
