"""quant_rtn: round-to-nearest weight-only quantization of the decoder linears (and the LM head).

The torch model keeps the dequantized weights (fake quantization), so it stays the numerical
reference for the quantized engine; the codes go to the emitter in `ir.quantized`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from llmc.errors import PassError
from llmc.kernels.quant import quantize_rtn

log = logging.getLogger(__name__)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantRTN:
    """Group-wise RTN to `bits` bits, symmetric or with float zero points."""

    name = "quant_rtn"

    def __init__(self, bits: int, group_size: int, symmetric: bool, lm_head: bool, zero_point: str = "int"):
        self.bits, self.group_size, self.symmetric, self.lm_head = bits, group_size, symmetric, lm_head
        self.zero_point = zero_point

    def check(self, ir) -> None:
        if getattr(ir, "quantized", None):
            raise PassError("quant_rtn: the model is already quantized")

    def _quantize(self, ir, name: str, weight: torch.Tensor) -> dict:
        w = weight.detach().float().numpy().copy()  # not a view: the weight is overwritten below
        qw = quantize_rtn(w, self.bits, self.group_size, self.symmetric, self.zero_point)
        deq = qw.dequantize()
        ir.quantized[name] = qw
        weight.data.copy_(torch.from_numpy(deq))
        return {"rel_error": float(np.linalg.norm(deq - w) / max(np.linalg.norm(w), 1e-12))}

    def run(self, ir) -> dict:
        ir.quantized = {}
        model = ir.model
        errors = {}
        layers = list(model.layers)
        for i, layer in enumerate(layers):
            for attr in LINEARS:
                errors[f"layers.{i}.{attr}"] = self._quantize(ir, f"layers.{i}.{attr}", getattr(layer, attr).weight)
            log.info("    quant_rtn: layer %d/%d", i + 1, len(layers))
        if self.lm_head:
            if model.lm_head is None:  # tied: the head gets its own quantized copy; the embedding stays fp32
                model.lm_head = torch.nn.Linear(model.geo.hidden_size, model.geo.vocab_size, bias=False)
                model.lm_head.weight.data.copy_(model.embed.weight.data)
            errors["lm_head"] = self._quantize(ir, "lm_head", model.lm_head.weight)
        worst = max(errors, key=lambda k: errors[k]["rel_error"])
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "zero_point": None if self.symmetric else self.zero_point,
                "lm_head": self.lm_head, "num_quantized": len(errors),
                "mean_rel_weight_error": float(np.mean([e["rel_error"] for e in errors.values()])),
                "worst": {"name": worst, **errors[worst]}, "per_layer": errors}
