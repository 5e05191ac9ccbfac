"""The TensorRT target: the step graph with standard int4 QDQ weights, and its engine when TensorRT is here.

The ONNX is the same step graph as the onnxruntime target except that quantized linears are
DequantizeLinear (signed int4, block_size along K, no zero point) + MatMul, the form TensorRT's
ONNX parser maps to weight-only int4 GEMMs; onnxruntime runs it too, which is how it is verified
on hosts without a GPU. The engine (a serialized plan) is built with TensorRT's Python API when
`tensorrt` imports; otherwise the manifest says so, and nothing pretends to be an engine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from llmc.compiler.emit_onnx import GRAPH_FILE, EmitOptions, emit_onnx
from llmc.errors import EmitError

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"


def _profile_shapes(geo, block_size: int, max_tokens: int, max_seqs: int, max_blocks: int) -> dict:
    """min / opt / max shapes of every dynamic input, for one optimization profile."""
    blocks_per_seq = -(-geo.max_position // block_size)
    shapes = {"input_ids": ((1,), (max_seqs,), (max_tokens,)), "positions": ((1,), (max_seqs,), (max_tokens,)),
              "block_tables": ((1, 1), (max_seqs, blocks_per_seq // 4 or 1), (max_seqs, blocks_per_seq)),
              "context_lens": ((1,), (max_seqs,), (max_seqs,)),
              "query_start": ((2,), (max_seqs + 1,), (max_seqs + 1,)),
              "logits_index": ((1,), (max_seqs,), (max_seqs,))}
    for i in range(geo.num_layers):
        for kind in ("key", "value"):
            shapes[f"{kind}_pool_{i}"] = tuple(geo.pool_shape(n, block_size) for n in (1, max_blocks, max_blocks))
    return shapes


def build_plan(onnx_path: Path, plan_path: Path, geo, block_size: int, max_tokens: int = 2048,
               max_seqs: int = 64, max_blocks: int = 4096) -> dict:
    """Parse the ONNX with TensorRT and serialize an engine (needs an NVIDIA GPU and the tensorrt package)."""
    import tensorrt as trt

    from llmc.artifacts.tensorrt_plan import compute_capability
    from llmc.compiler import trt_plugin

    missing = trt_plugin.register()  # llmc.PagedAttention nodes then build from the plugin, not their ONNX body
    if missing:
        log.warning("the llmc::PagedAttention plugin is not registered (%s): TensorRT builds the nodes' ONNX "
                    "function bodies", missing)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EmitError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in _profile_shapes(geo, block_size, max_tokens, max_seqs, max_blocks).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EmitError("TensorRT failed to build the engine; run with -v to see its log")
    plan_path.write_bytes(serialized)
    return {"plan": plan_path.name, "tensorrt": trt.__version__, "compute_capability": compute_capability(),
            "build_seconds": round(time.perf_counter() - start, 1),
            "profile": {"max_tokens": max_tokens, "max_seqs": max_seqs, "max_blocks": max_blocks}}


def emit_tensorrt(model, out_dir: Path, quantized: dict, block_size: int, kv_dtype: str = "float32") -> dict:
    """Write the QDQ step graph and, where TensorRT is installed, its engine; returns the manifest entry."""
    entry = emit_onnx(model, out_dir, quantized, EmitOptions(weight_format="qdq", kv_dtype=kv_dtype))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reason = ("TensorRT is not installed on this build host: the engine was not built. Build it on the GPU "
                  "server from engines/tensorrt/model.onnx (trtexec --onnx=model.onnx --stronglyTyped), or rerun "
                  "`llmc build` there with `pip install tensorrt`")
        log.warning("tensorrt: %s", reason)
        return {**entry, "plan": None, "skipped": reason}
    log.info("building the TensorRT engine (this takes minutes)")
    return {**entry, **build_plan(out_dir / GRAPH_FILE, out_dir / PLAN_FILE, model.geo, block_size)}
