"""What every weight-quantization pass shares: which linears it touches, storing codes, the record it returns."""

from __future__ import annotations

import numpy as np
import torch

from llmc.errors import PassError
from llmc.kernels.quant import GridConfig, QuantizedWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_unquantized(ir, name: str) -> None:
    """Precondition of every quantization pass: nothing is quantized yet."""
    if getattr(ir, "quantized", None):
        raise PassError(f"{name}: the model is already quantized")


def untie_lm_head(model) -> torch.nn.Linear:
    """The LM head as its own Linear (a tied head gets a copy; the embedding stays fp32)."""
    if model.lm_head is None:
        model.lm_head = torch.nn.Linear(model.geo.hidden_size, model.geo.vocab_size, bias=False)
        model.lm_head.weight.data.copy_(model.embed.weight.data)
    return model.lm_head


def store(ir, name: str, weight: torch.Tensor, qw: QuantizedWeight) -> dict:
    """Keep the codes for the emitter and put their dequantized values into the torch weight (fake quant)."""
    original = weight.detach().float().clone()
    deq = torch.from_numpy(qw.dequantize())
    ir.quantized[name] = qw
    weight.data.copy_(deq)
    return {"rel_error": float((deq - original).norm() / original.norm().clamp(min=1e-12))}


def record(cfg: GridConfig, head: GridConfig | None, weight_errors: dict, **extra) -> dict:
    """The pass record: the grid, the mean and worst weight error, and every linear's error."""
    worst = max(weight_errors, key=lambda k: weight_errors[k]["rel_error"])
    return {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
            "zero_point": None if cfg.symmetric else cfg.zero_point,
            "lm_head_bits": head.bits if head else None,
            "num_quantized": len(weight_errors),
            "mean_rel_weight_error": float(np.mean([e["rel_error"] for e in weight_errors.values()])),
            "worst": {"name": worst, **weight_errors[worst]}, **extra, "per_linear": weight_errors}
