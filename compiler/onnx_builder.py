"""A small helper for writing ONNX graphs and functions node by node."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; `op()` returns the output name(s) of the node it adds."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._prefix = prefix
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self._prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None,
           refs: dict[str, tuple[str, int]] | None = None, **attrs):
        """Add a node; returns one output name, or a list when outputs > 1.

        refs maps attribute names to (the enclosing function's attribute, its AttributeProto type).
        """
        out_names = [self._name(op_type.lower()) for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), out_names, name=name or self._name(op_type),
                                domain=domain, **attrs)
        for attr, (ref, kind) in (refs or {}).items():
            node.attribute.append(onnx.AttributeProto(name=attr, ref_attr_name=ref, type=kind))
        self.nodes.append(node)
        return out_names[0] if outputs == 1 else out_names

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        """Add a node whose single output has a fixed name (graph outputs)."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type), **attrs))
        return output

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        """A constant tensor as a Constant node (small values, usable inside functions too)."""
        out = name or self._name("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], value=tensor, name=self._name("Constant")))
        return out

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (stored as external data when the model is saved)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name
