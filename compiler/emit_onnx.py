"""Emit the onnxruntime engine: one step graph implementing the engine step contract.

Inputs  input_ids int64 [T], positions int64 [T], block_tables int32 [S, M], context_lens int32 [S],
        query_start int32 [S+1], logits_index int64 [N], key_pool_{i}/value_pool_{i} [NB, B, KVH, D]
Outputs logits float32 [N, vocab], new_keys/new_values [layers, T, KVH, D] (the runtime writes
        them into its pools at slot_mapping: onnxruntime cannot update an input in place).
Weights are stored as external data next to the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from llmc.compiler import onnx_int4_linear as i4
from llmc.compiler import onnx_int8_linear as il
from llmc.compiler import onnx_paged_attention as pa
from llmc.compiler.model import LlamaModel
from llmc.compiler.onnx_builder import GraphBuilder
from llmc.kernels.quant import concat_rows

log = logging.getLogger(__name__)

OPSET = pa.OPSET  # 23: the standard Attention and RotaryEmbedding ops
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PREFILL_GRAPH_FILE = "prefill.onnx"
PREFILL_DATA_FILE = "prefill.onnx.data"
DECODE_GRAPH_FILE = "decode.onnx"
DECODE_DATA_FILE = "decode.onnx.data"


@dataclass(frozen=True)
class EmitOptions:
    """How the engine's graphs compute, as the spec asks; the weights they compute with are passed apart."""

    weight_format: str = "matmulnbits"  # quantized linears as MatMulNBits, or "qdq": DequantizeLinear + MatMul
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations, 0 = float32 compute
    activation_block_size: int | None = None  # MatMulNBits at level 4: int8 activation blocks (None: the groups)
    kv_dtype: str = "float32"  # the pools' (and the returned K/V's) dtype
    int8_prefill: bool = False  # also the int8 graph (llmc.Int8Linear) for steps of many tokens
    int4_decode: bool = False  # also the int4 graph (llmc.Int4Linear) for steps of few tokens


DEFAULT_OPTIONS = EmitOptions()  # a float32 graph over float32 pools, quantized linears as MatMulNBits level 4


@dataclass(frozen=True)
class _LinearSource:
    """What one graph's linears are built from: quantized weights and outlier channels by linear name, the
    options, and which of the engine's graphs this is."""

    options: EmitOptions
    quantized: dict = field(default_factory=dict)  # name -> QuantizedWeight
    outliers: dict = field(default_factory=dict)  # name -> outlier input channels (the int8 graph)
    int8: bool = False  # every linear as llmc.Int8Linear (the int8 graph)
    int4: bool = False  # 4-bit linears as llmc.Int4Linear (the int4 decode graph)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    # The Pow/ReduceMean/Add/Sqrt/Div/Mul pattern that onnxruntime fuses into SimplifiedLayerNormalization.
    mean_sq = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.const(eps, np.float32)))
    return g.op("Mul", g.op("Div", x, denom), weight)


def _add_rms_norm(g: GraphBuilder, x: str, residual: str | None, weight: str, eps: float,
                  fused: bool) -> tuple[str, str]:
    """(rms_norm(x + residual), x + residual), or of x alone without a residual. fused: one
    com.microsoft.SkipSimplifiedLayerNormalization node (onnxruntime graphs; at batch 1 a step's ~60
    residual Adds and norms were ~10% of its node time, most of it per-node overhead)."""
    if residual is None:
        return _rms_norm(g, x, weight, eps), x
    if not fused:
        x = g.op("Add", x, residual)
        return _rms_norm(g, x, weight, eps), x
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", x, residual, weight, domain="com.microsoft",
                               outputs=4, epsilon=eps)
    g.nodes[-1].output[1] = g.nodes[-1].output[2] = ""  # no mean or inverse deviation (optional outputs)
    return normed, total


def _linear(g: GraphBuilder, x: str, name: str, linear: torch.nn.Linear, src: _LinearSource) -> str:
    return _fused_linear(g, x, [name], [linear], src)[0]


def _fused_linear(g: GraphBuilder, x: str, names: list[str], linears: list[torch.nn.Linear],
                  src: _LinearSource) -> list[str]:
    """Linears that read the same x, as one matmul over their stacked weights (then split): fewer,
    larger kernels per step. Falls back to one matmul each when their formats differ."""
    quantized = [src.quantized.get(name) for name in names]
    outliers = [src.outliers.get(name, []) for name in names] if src.int8 else []
    if outliers and all(il.supports(linear.in_features, len(o)) for linear, o in zip(linears, outliers)):
        # the int8 graph: q/k/v as one Int8LinearSplit3 node where their outlier channels agree (one
        # quantization of x, outputs written in place), else one node per linear
        weights = [q.dequantize() if q is not None else _np(linear.weight) for q, linear in zip(quantized, linears)]
        widths = [w.shape[0] for w in weights]
        if len(names) == 3 and all(w % il.OUTPUT_ALIGN == 0 for w in widths) \
                and all(np.array_equal(o, outliers[0]) for o in outliers):
            outs = il.int8_linear(g, x, "+".join(names), np.concatenate(weights), outliers[0], splits=widths)
        else:
            outs = [il.int8_linear(g, x, name, w, o) for name, w, o in zip(names, weights, outliers)]
        for i, linear in enumerate(linears):
            if linear.bias is not None:
                outs[i] = g.op("Add", outs[i], g.weight(f"{names[i]}.bias", _np(linear.bias)))
        return outs
    elif all(q is not None for q in quantized):
        stacked = concat_rows(quantized)
        if stacked is None:
            return [_linear(g, x, name, linear, src) for name, linear in zip(names, linears)]
        fused = "+".join(names)
        out = (_matmul_qdq(g, x, fused, stacked) if src.options.weight_format == "qdq"
               else i4.int4_linear(g, x, fused, stacked) if src.int4 and i4.supports(stacked)
               else _matmul_nbits(g, x, fused, stacked, src.options))
    elif any(q is not None for q in quantized):
        return [_linear(g, x, name, linear, src) for name, linear in zip(names, linears)]
    else:  # Gemm with transB keeps the [out, in] weight as stored: no transposed copy.
        weight = np.concatenate([_np(linear.weight) for linear in linears])
        out = g.op("Gemm", x, g.weight("+".join(names) + ".weight", weight), transB=1)
    if any(linear.bias is not None for linear in linears):
        bias = np.concatenate([np.zeros(linear.out_features, np.float32) if linear.bias is None else _np(linear.bias)
                               for linear in linears])
        out = g.op("Add", out, g.weight("+".join(names) + ".bias", bias))
    if len(linears) == 1:
        return [out]
    sizes = g.const([linear.out_features for linear in linears])
    return g.op("Split", out, sizes, axis=-1, outputs=len(linears))


def _matmul_nbits(g: GraphBuilder, x: str, name: str, qw, options: EmitOptions) -> str:
    """com.microsoft.MatMulNBits over packed codes; float zero points when the weight has them.

    At accuracy level 4 the kernel quantizes activations to int8 per block of block_size input
    channels: groups wider than options.activation_block_size are split into blocks sharing their
    scale and zero point (the same weight; int8 activation error as with small groups).
    """
    accuracy_level = options.accuracy_level
    if accuracy_level == 4 and options.activation_block_size:
        qw = qw.split_blocks(options.activation_block_size)
    inputs = [x, g.weight(f"{name}.qweight", qw.packed()), g.weight(f"{name}.scales", qw.scale.reshape(-1))]
    if qw.zero is not None:
        inputs.append(g.weight(f"{name}.zeros", qw.packed_zeros()))
    return g.op("MatMulNBits", *inputs, domain="com.microsoft", K=qw.in_features, N=qw.q.shape[0],
                bits=qw.bits, block_size=qw.block_size, accuracy_level=accuracy_level)


def _matmul_qdq(g: GraphBuilder, x: str, name: str, qw) -> str:
    """Standard ONNX: DequantizeLinear of signed int4 blocks along K (opset 21 block_size) + MatMul.

    What TensorRT's ONNX parser takes for int4 weight-only quantization (symmetric: no zero point).
    """
    n, k = qw.q.shape[0], qw.in_features
    signed = (qw.q.astype(np.int8) - 8).reshape(n, -1)[:, :k].T.reshape(-1)  # [K * N], codes in [-8, 7]
    if signed.size % 2:
        signed = np.append(signed, np.int8(0))
    tensor = onnx.TensorProto(name=f"{name}.qweight_int4", data_type=onnx.TensorProto.INT4, dims=[k, n])
    tensor.raw_data = ((signed[0::2] & 0x0F) | ((signed[1::2] & 0x0F) << 4)).astype(np.uint8).tobytes()
    g.initializers.append(tensor)
    scales = g.weight(f"{name}.scales", np.ascontiguousarray(qw.scale.T))  # [K / block, N]
    w = g.op("DequantizeLinear", tensor.name, scales, axis=0, block_size=qw.block_size)  # [K, N]
    return g.op("MatMul", x, w)


def _mlp(g: GraphBuilder, h: str, p: str, layer, src: _LinearSource) -> str:
    """SwiGLU MLP of normed h [T, hidden]."""
    gate, up = _fused_linear(g, h, [f"{p}.gate_proj", f"{p}.up_proj"], [layer.gate_proj, layer.up_proj], src)
    mlp = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return _linear(g, mlp, f"{p}.down_proj", layer.down_proj, src)


def _int8_mlp(g: GraphBuilder, h: str, p: str, layer, src: _LinearSource) -> str | None:
    """The int8 graph's MLP as two nodes: gate | up as one Int8LinearGLU (they share h and its outlier
    channels), which applies silu(gate) * up as its tiles are stored and returns [T, I] (half the bytes of
    gate | up, and no activation pass), then down_proj as Int8Linear (where I is not a multiple of 16: gate
    | up as Int8Linear, then down_proj as Int8LinearSwiGLU, which applies silu(gate) * up as it quantizes);
    None where the int8 path does not apply."""
    if not src.int8:
        return None
    names = [f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"]
    linears = [layer.gate_proj, layer.up_proj, layer.down_proj]
    outliers = [np.asarray(src.outliers.get(n, []), dtype=np.int64) for n in names]
    if not all(il.supports(lin.in_features, len(o)) for lin, o in zip(linears, outliers)) \
            or any(lin.bias is not None for lin in linears) or not np.array_equal(outliers[0], outliers[1]):
        return None
    weights = [src.quantized[n].dequantize() if n in src.quantized else _np(lin.weight)
               for n, lin in zip(names, linears)]
    if layer.gate_proj.out_features % il.GLU_ALIGN == 0:
        mlp = il.int8_linear(g, h, f"{p}.gate_up_proj", np.concatenate(weights[:2]), outliers[0], glu=True)  # [T, I]
        return il.int8_linear(g, mlp, names[2], weights[2], outliers[2])
    gate_up = il.int8_linear(g, h, f"{p}.gate_up_proj", np.concatenate(weights[:2]), outliers[0])  # [T, 2I]
    return il.int8_linear(g, gate_up, names[2], weights[2], outliers[2], swiglu=True)


def _int4_mlp(g: GraphBuilder, h: str, p: str, layer, src: _LinearSource) -> str | None:
    """The int4 decode graph's MLP as two nodes: gate | up as one Int4LinearGLU (silu(gate) * up as its tiles
    are stored: no Split, Sigmoid and Muls), then down_proj; None where the weights do not fit the op."""
    names = [f"{p}.gate_proj", f"{p}.up_proj"]
    if not src.int4 or any(n not in src.quantized for n in names) or layer.gate_proj.bias is not None \
            or layer.up_proj.bias is not None or layer.gate_proj.out_features % i4.GLU_ALIGN:
        return None
    stacked = concat_rows([src.quantized[n] for n in names])
    if stacked is None or not i4.supports(stacked):
        return None
    mlp = i4.int4_linear(g, h, f"{p}.gate_up_proj", stacked, glu=True)  # [T, I]
    return _linear(g, mlp, f"{p}.down_proj", layer.down_proj, src)


def _int8_codes(g: GraphBuilder, x: str, scale: np.ndarray, name: str) -> str:
    """int8 codes of x [T, C] on per-channel scales [C]: x * (1 / scale), then QuantizeLinear with one scale
    of 1 (onnxruntime's per-axis QuantizeLinear is a scalar loop: 30% of an int8-KV step; per-tensor is
    vectorized)."""
    inverse = g.weight(f"{name}_inverse", (1.0 / scale).astype(np.float32))
    return g.op("QuantizeLinear", g.op("Mul", x, inverse), g.const(1.0, np.float32), g.const(0, np.int8))


def build_graph(model: LlamaModel, quantized: dict | None = None, options: EmitOptions = DEFAULT_OPTIONS, *,
                outlier_channels: dict | None = None, kv_scales: dict | None = None, int8_linears: bool = False,
                int4_linears: bool = False) -> onnx.ModelProto:
    """Translate llmc's torch model into the step graph (weights inline; saved as external data).

    Linears named in `quantized` become com.microsoft.MatMulNBits nodes over their codes, or with
    options.weight_format "qdq" standard DequantizeLinear + MatMul (the TensorRT target). q/k/v and gate/up
    each run as one matmul over stacked weights.
    int8_linears: every linear, the LM head included, becomes llmc.Int8Linear (int8 weights per output
    channel, int8 activations per token, the linear's outlier_channels in bf16: the int8 graph).
    options.kv_dtype int8 takes kv_scales (passes/kv_scales): the graph returns K/V as int8 codes of those scales.
    int4_linears: 4-bit linears with integer zero points become llmc.Int4Linear (the int4 decode graph).
    """
    geo, kv_dtype = model.geo, options.kv_dtype
    src = _LinearSource(options, quantized or {}, outlier_channels or {}, int8_linears,
                        int4_linears and not int8_linears)
    g = GraphBuilder()
    embed = g.weight("embed.weight", _np(model.embed.weight))
    half = geo.head_dim // 2
    rope = {"rope_cos": g.weight("rope.cos", _np(model.rope_cos[:, :half])),  # [P, D/2]
            "rope_sin": g.weight("rope.sin", _np(model.rope_sin[:, :half]))}
    plan = pa.build_plan(g, geo.num_kv_heads, geo.head_dim, "key_pool_0")
    x = g.op("Gather", embed, "input_ids", axis=0)  # [T, hidden]
    new_keys, new_values = [], []
    bf16_tiles = {"bf16_tiles": 1} if int8_linears else {}  # the int8 graph: prefill attention in bf16 too
    if options.weight_format == "qdq":  # the tensorrt target: TensorRT's parser builds the node from llmc's plugin
        bf16_tiles["plugin_namespace"] = pa.DOMAIN
    if kv_dtype == "int8" and len(kv_scales or {}) != geo.num_layers:
        raise ValueError("int8 KV pools need kv_scales for every layer (passes/kv_scales)")
    fused_norms = options.weight_format != "qdq"  # the TensorRT target's graph keeps standard ops
    mlp_out = None  # the previous layer's MLP output, added to x by the next norm
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        h, x = _add_rms_norm(g, x, mlp_out, g.weight(f"{p}.attn_norm", _np(layer.attn_norm)), geo.rms_norm_eps,
                             fused_norms)
        q, k, v = _fused_linear(g, h, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"],
                                [layer.q_proj, layer.k_proj, layer.v_proj], src)  # [T, heads * D]
        scales = ([g.weight(f"{p}.{name}", kv_scales[i][j]) for j, name in enumerate(pa.SCALES)]
                  if kv_dtype == "int8" else [])  # [KVH * D] each
        attn, k_rotated = g.op(pa.OP_TYPE, q, k, v, f"key_pool_{i}", f"value_pool_{i}", *plan.values(),
                               rope["rope_cos"], rope["rope_sin"], *scales, domain=pa.DOMAIN,
                               name=f"{p}.paged_attention", outputs=2, scale=float(geo.head_dim ** -0.5),
                               num_heads=geo.num_heads, kv_num_heads=geo.num_kv_heads, **bf16_tiles)  # extra attrs
        h, x = _add_rms_norm(g, x, _linear(g, attn, f"{p}.o_proj", layer.o_proj, src),
                             g.weight(f"{p}.mlp_norm", _np(layer.mlp_norm)), geo.rms_norm_eps, fused_norms)
        mlp_out = _int8_mlp(g, h, p, layer, src) or _int4_mlp(g, h, p, layer, src) or _mlp(g, h, p, layer, src)
        if scales:  # codes of the pools' static scales, per channel (saturating, round half to even)
            k_rotated, v = (_int8_codes(g, x_, kv_scales[i][j], f"{p}.{name}")
                            for j, (x_, name) in enumerate(zip((k_rotated, v), pa.SCALES)))
        new_keys.append(k_rotated)
        new_values.append(v)
    x = g.op("Add", x, mlp_out)
    h = _rms_norm(g, g.op("Gather", x, "logits_index", axis=0), g.weight("norm", _np(model.norm)), geo.rms_norm_eps)
    head_outliers = src.outliers.get("lm_head", [])
    # the int8 graph: the LM head too, with its outlier channels (a second level of activation codes, the
    # first level's rounding error quantized again, scored 16.790 vs 16.789 perplexity on 16 held-out
    # windows, for twice the head's tile work)
    if int8_linears and il.supports(geo.hidden_size, len(head_outliers)):
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        weight = src.quantized["lm_head"].dequantize() if "lm_head" in src.quantized else _np(head)
        g.op_to("Identity", [il.int8_linear(g, h, "lm_head", weight, head_outliers)], "logits")
    elif "lm_head" in src.quantized:
        g.op_to("Identity", [_linear(g, h, "lm_head", model.lm_head, src)], "logits")
    else:
        head = embed if model.lm_head is None else g.weight("lm_head.weight", _np(model.lm_head.weight))
        g.op_to("Gemm", [h, head], "logits", transB=1)
    kv_shape = g.const([geo.num_layers, -1, geo.num_kv_heads, geo.head_dim])
    kv_type = pa.POOL_TYPES[kv_dtype]
    for name, parts in (("new_keys", new_keys), ("new_values", new_values)):  # [layers, T, KVH, D]
        if kv_type in (TensorProto.FLOAT, TensorProto.INT8):
            g.op_to("Reshape", [g.op("Concat", *parts, axis=0), kv_shape], name)
        else:
            g.op_to("Cast", [g.op("Reshape", g.op("Concat", *parts, axis=0), kv_shape)], name, to=kv_type)

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    pool_shape = list(geo.pool_shape("num_blocks", "block_size"))
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["T"]),
              helper.make_tensor_value_info("positions", i64, ["T"]),
              helper.make_tensor_value_info("block_tables", i32, ["S", "M"]),
              helper.make_tensor_value_info("context_lens", i32, ["S"]),
              helper.make_tensor_value_info("query_start", i32, ["S_plus_1"]),
              helper.make_tensor_value_info("logits_index", i64, ["N"])]
    for i in range(geo.num_layers):
        inputs.append(helper.make_tensor_value_info(f"key_pool_{i}", kv_type, pool_shape))
        inputs.append(helper.make_tensor_value_info(f"value_pool_{i}", kv_type, pool_shape))
    kv_out = [geo.num_layers, "T", geo.num_kv_heads, geo.head_dim]
    outputs = [helper.make_tensor_value_info("logits", f32, ["N", geo.vocab_size]),
               helper.make_tensor_value_info("new_keys", kv_type, kv_out),
               helper.make_tensor_value_info("new_values", kv_type, kv_out)]
    graph = helper.make_graph(g.nodes, "llmc_step", inputs, outputs, g.initializers)
    functions = [pa.build_function(kv_dtype)] + ([il.build_function(op) for op in il.FUNCTIONS] if int8_linears else [])
    functions += [i4.build_function(op) for op in i4.FUNCTIONS] if src.int4 else []
    return helper.make_model(
        graph, functions=functions, producer_name="llmc",
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(pa.DOMAIN, 1),
                       helper.make_opsetid("com.microsoft", 1)])


def _save(proto: onnx.ModelProto, path: Path, data_file: str) -> None:
    """Write a graph with its weights as one external data file beside it, and check it."""
    log.info("writing %s with its weights in %s", path, data_file)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file,
                    size_threshold=0)
    onnx.checker.check_model(str(path))


def emit_onnx(model: LlamaModel, out_dir: Path, quantized: dict | None = None, options: EmitOptions = DEFAULT_OPTIONS,
              *, outlier_channels: dict | None = None, kv_scales: dict | None = None) -> dict:
    """Write model.onnx + model.onnx.data into out_dir (and with options.int8_prefill the int8 prefill graph,
    prefill.onnx + prefill.onnx.data, its linears' outlier channels from passes/act_outliers; with
    options.int4_decode and 4-bit weights the int4 decode graph, decode.onnx + decode.onnx.data, its linears
    llmc.Int4Linear); return the engine's manifest fields (artifacts.manifest.Engine, less its dir)."""
    o, quantized = options, quantized or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the ONNX step graph (%d layers, %d quantized linears)", model.geo.num_layers, len(quantized))
    if o.weight_format == "matmulnbits" and o.accuracy_level != 4 and any(q.bits == 8 for q in quantized.values()):
        log.warning("accuracy_level %d with 8-bit weights: onnxruntime's CPU MatMulNBits has no fp32 8-bit kernel "
                    "and dequantizes them at every step (a SmolLM2-135M decode step: 84 ms instead of 8); use "
                    "it to verify the engine, serve with accuracy_level 4", o.accuracy_level)
    _save(build_graph(model, quantized, o, kv_scales=kv_scales), out_dir / GRAPH_FILE, DATA_FILE)
    nbits = bool(quantized) and o.weight_format == "matmulnbits"
    prefill = None
    if o.int8_prefill:
        log.info("building the int8 prefill graph (llmc.Int8Linear: int8 weights and activations)")
        proto = build_graph(model, quantized, o, outlier_channels=outlier_channels, kv_scales=kv_scales,
                            int8_linears=True)
        _save(proto, out_dir / PREFILL_GRAPH_FILE, PREFILL_DATA_FILE)
        prefill = {"graph": PREFILL_GRAPH_FILE, "weights": PREFILL_DATA_FILE, "linear_op": f"{il.DOMAIN}.{il.OP_TYPE}",
                   "linear_format": il.FORMAT,
                   "weights_format": "int8 per output channel; outlier input channels bf16",
                   "activations": "int8 per token; outlier input channels bf16",
                   "attention": "prefill tiles (>= 16 rows of a sequence) on AMX bf16 tiles; decodes float32"}
    decode = None
    if o.int4_decode and nbits and o.accuracy_level == 4 and any(i4.supports(q) for q in quantized.values()):
        log.info("building the int4 decode graph (llmc.Int4Linear: int4 weights, int8 activation blocks)")
        _save(build_graph(model, quantized, o, kv_scales=kv_scales, int4_linears=True),
              out_dir / DECODE_GRAPH_FILE, DECODE_DATA_FILE)
        decode = {"graph": DECODE_GRAPH_FILE, "weights": DECODE_DATA_FILE, "linear_op": f"{i4.DOMAIN}.{i4.OP_TYPE}",
                  "linear_format": i4.FORMAT}
    return {"format": "onnx", "prefill": prefill, "decode": decode, "graph": GRAPH_FILE, "weights": DATA_FILE,
            "opset": OPSET,
            "attention_op": f"{pa.DOMAIN}.{pa.OP_TYPE}", "attention_plan": pa.PLAN_FORMAT, "kv_update": "returned",
            "quantized_linears": sorted(quantized), "weight_format": o.weight_format if quantized else None,
            "accuracy_level": o.accuracy_level if nbits else None,
            "activation_block_size": o.activation_block_size if nbits and o.accuracy_level == 4 else None,
            "outputs": ["logits", "new_keys", "new_values"]}
