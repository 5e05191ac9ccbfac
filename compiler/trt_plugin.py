"""`llmc::PagedAttention` as a TensorRT plugin, through TensorRT's Python plugin API (`tensorrt.plugin`, 10.7+).

The tensorrt target's graph marks each llmc.PagedAttention node with `plugin_namespace = "llmc"`: TensorRT's ONNX
parser then builds the node from this registered plugin, and where none is registered it expands the node's ONNX
function body. The AOT implementation compiles the Triton kernel of the node's semantics
(kernels/triton/node_attention.py) to PTX when the engine is built, so the engine runs without Python.
`register()` is called by the engine build; where tensorrt is missing it says why and registers nothing.

No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations with
inspect.signature and needs the classes themselves (TensorDesc, float, int), not their names as strings; it also
requires the return annotations (checked against tensorrt 11.4's tensorrt/plugin/_validate.py).
"""

import logging

log = logging.getLogger(__name__)

PLUGIN_ID = "llmc::PagedAttention"
NAMESPACE = "llmc"
BLOCK_M, BLOCK_N, NUM_WARPS = 16, 32, 4
# TensorRT data types (by name) -> Triton pointer types, for the kernel's signature
POINTER_TYPES = {"FLOAT": "*fp32", "HALF": "*fp16", "BF16": "*bf16", "INT64": "*i64", "INT32": "*i32"}
ARGUMENTS = ["q_ptr", "k_ptr", "v_ptr", "key_pool_ptr", "value_pool_ptr", "query_index_ptr", "positions_ptr",
             "tables_ptr", "cached_shape_ptr", "lengths_ptr", "token_index_ptr", "cos_ptr", "sin_ptr"]
_registered = False


def _pointer_type(desc) -> str:
    name = getattr(desc.dtype, "name", str(desc.dtype)).split(".")[-1]
    if name not in POINTER_TYPES:
        raise ValueError(f"llmc::PagedAttention: no kernel for {name} tensors")
    return POINTER_TYPES[name]


def describe(q, k, *_inputs):
    """The plugin's outputs: attention [T, H*D] like q, the rotated keys [T, KVH*D] like k."""
    return q.like(), k.like()


def kernel_signature(inputs: list, outputs: list) -> dict[str, str]:
    """The Triton signature of node_kernel for these tensors: inputs, the two integer scalars, outputs."""
    signature = {name: _pointer_type(desc) for name, desc in zip(ARGUMENTS, inputs)}
    signature.update({"q_max": "i32", "table_stride": "i32"})
    signature.update({"out_ptr": _pointer_type(outputs[0]), "k_rot_ptr": _pointer_type(outputs[1])})
    return signature


def register() -> str | None:
    """Register llmc::PagedAttention with TensorRT; None when registered, else why it cannot be."""
    global _registered
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        return "tensorrt with tensorrt.plugin (10.7 or later) is not installed"
    if _registered:
        return None

    @trtp.register(PLUGIN_ID)
    def paged_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k_pool: trtp.TensorDesc,
                             v_pool: trtp.TensorDesc, query_index: trtp.TensorDesc, query_positions: trtp.TensorDesc,
                             cached_tables: trtp.TensorDesc, cached_shape: trtp.TensorDesc, lengths: trtp.TensorDesc,
                             token_index: trtp.TensorDesc, rope_cos: trtp.TensorDesc, rope_sin: trtp.TensorDesc,
                             scale: float, num_heads: int, kv_num_heads: int
                             ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return describe(q, k)

    @trtp.aot_impl(PLUGIN_ID)
    def paged_attention_aot(q, k, v, k_pool, v_pool, query_index, query_positions, cached_tables, cached_shape,
                            lengths, token_index, rope_cos, rope_sin, scale: float, num_heads: int,
                            kv_num_heads: int, outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
                            ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        inputs = [q, k, v, k_pool, v_pool, query_index, query_positions, cached_tables, cached_shape, lengths,
                  token_index, rope_cos, rope_sin]
        return aot_kernel(trtp, inputs, list(outputs), scale, num_heads, kv_num_heads)

    _registered = True
    log.info("registered the TensorRT plugin %s (AOT: the Triton kernel compiled to PTX)", PLUGIN_ID)
    return None


def _constant(desc, axis: int, name: str) -> int:
    """A build-time constant dimension (a ShapeExpr has no int(): its constant_value())."""
    dim = desc.shape_expr[axis]
    if dim.is_fake or not dim.is_constant:
        raise ValueError(f"llmc::PagedAttention: the KV pool's {name} (axis {axis}) must be fixed when the engine is "
                         "built; the optimization profile gives the pools one shape (min = opt = max)")
    return dim.constant_value()


def aot_kernel(trtp, inputs: list, outputs: list, scale: float, num_heads: int, kv_num_heads: int):
    """(kernel name, PTX, launch parameters, scalar arguments) of node_kernel for these tensors."""
    import triton

    from llmc.kernels.triton.node_attention import node_kernel

    k_pool, query_index, cached_tables = inputs[3], inputs[5], inputs[7]
    constexprs = {"SCALE": scale, "HEADS": num_heads, "KV_HEADS": kv_num_heads,
                  "HEAD_DIM": _constant(k_pool, 3, "head_dim"), "BLOCK_SIZE": _constant(k_pool, 1, "block_size"),
                  "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}
    source = triton.compiler.ASTSource(fn=node_kernel, signature={**kernel_signature(inputs, outputs),
                                                                  **dict.fromkeys(constexprs, "constexpr")},
                                       constexprs=constexprs)
    compiled = triton.compile(source, options={"num_warps": NUM_WARPS})
    launch = trtp.KernelLaunchParams()
    launch.grid_x = query_index.shape_expr[0]  # sequences
    launch.grid_y = num_heads
    launch.grid_z = trtp.cdiv(query_index.shape_expr[1], BLOCK_M)  # tiles of the longest chunk
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    scalars = trtp.SymIntExprs(2)
    scalars[0] = trtp.SymInt32(query_index.shape_expr[1])  # q_max
    scalars[1] = trtp.SymInt32(cached_tables.shape_expr[1])  # the cached tables' row stride
    return compiled.metadata.name, compiled.asm["ptx"], launch, scalars
