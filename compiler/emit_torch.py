"""Emit the `cuda` target: the model's weights for llmc's torch + Triton engine (runtime/engine_torch.py), one
safetensors file. Linears stay in llmc's int4 packing where they were quantized to 4 bits with integer zero
points or symmetric groups (the Triton int4 GEMM reads it as is); everything else is float16.

    layers.{i}.{q,k,v,o,gate,up,down}_proj.weight            float16 [N, K], or
    layers.{i}.{...}_proj.packed / .scale / .zero             uint8 [N, blocks, group / 2], float16 [N, blocks],
                                                              uint8 [N, blocks] (absent when symmetric)
    layers.{i}.{q,k,v}_proj.bias, layers.{i}.{attn,mlp}_norm, embed, norm, lm_head.*, rope.cos / rope.sin [P, D / 2]
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from llmc.compiler.model import LlamaModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
ATTENTION = "llmc Triton paged attention (split-KV decode, causal prefill)"
INT4_FORMAT = "llmc int4: packed [N, blocks, group/2] low nibble first, float16 scale, uint8 zero or symmetric"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).contiguous().numpy()


def _int4_ready(qw) -> bool:
    """Whether the Triton GEMM reads this weight as it is."""
    return qw.bits == 4 and qw.block_size % 2 == 0 and (qw.zero is None or qw.zero.dtype == np.uint8)


def _linear(tensors: dict, name: str, linear: torch.nn.Linear | None, weight: torch.Tensor | None,
            quantized: dict) -> bool:
    """Add one linear's tensors; whether it went in as int4."""
    qw = quantized.get(name)
    if qw is not None and _int4_ready(qw):
        tensors[f"{name}.packed"] = np.ascontiguousarray(qw.packed())
        tensors[f"{name}.scale"] = qw.scale.astype(np.float16)
        if qw.zero is not None:
            tensors[f"{name}.zero"] = np.ascontiguousarray(qw.zero)
        packed = True
    else:  # float (the fake-quant weight where it was quantized to other formats: 8-bit heads, float zeros)
        tensors[f"{name}.weight"] = _f16(linear.weight if linear is not None else weight)
        packed = False
    if linear is not None and linear.bias is not None:
        tensors[f"{name}.bias"] = _f16(linear.bias)
    return packed


def emit_torch(model: LlamaModel, out_dir: Path, quantized: dict | None = None) -> dict:
    """Write weights.safetensors into out_dir; return the engine's manifest fields (less its dir)."""
    quantized = quantized or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    geo, tensors, int4 = model.geo, {}, []
    half = geo.head_dim // 2
    tensors["embed"] = _f16(model.embed.weight)
    tensors["norm"] = _f16(model.norm)
    tensors["rope.cos"] = model.rope_cos[:, :half].float().contiguous().numpy()  # [P, D/2], float32
    tensors["rope.sin"] = model.rope_sin[:, :half].float().contiguous().numpy()
    for i, layer in enumerate(model.layers):
        tensors[f"layers.{i}.attn_norm"] = _f16(layer.attn_norm)
        tensors[f"layers.{i}.mlp_norm"] = _f16(layer.mlp_norm)
        for name in LINEARS:
            if _linear(tensors, f"layers.{i}.{name}", getattr(layer, name), None, quantized):
                int4.append(f"layers.{i}.{name}")
    if model.lm_head is not None or "lm_head" in quantized:
        if _linear(tensors, "lm_head", model.lm_head, model.lm_head_weight(), quantized):
            int4.append("lm_head")
    log.info("writing %s (%d int4 linears, the rest float16)", out_dir / WEIGHTS_FILE, len(int4))
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    return {"format": "safetensors", "graph": None, "weights": WEIGHTS_FILE, "opset": None, "attention_op": ATTENTION,
            "kv_update": "in_place", "outputs": ["logits"], "quantized_linears": sorted(int4),
            "weight_format": INT4_FORMAT if int4 else None}
