"""Activation outliers: find, per linear, the input channels whose calibration activations are largest,
for the int8 graph to keep out of its int8 range (compiler/onnx_int8_linear.py computes them in bf16).

A few channels of an LLM's hidden state carry activations far above the others' (SmolLM2-135M: a
linear's largest max |x| is a median 4.9x, at most 692x, its 129th largest). One int8 scale per token
sized for them leaves the other channels a few codes: +3.9% perplexity with every body linear quantized
so (fake-quant, held-out windows). With each linear's largest channels in bf16, the whole int8 graph
(LM head too) scored +0.52% over 24 held-out windows with 64 channels and +0.22% with 128 (the
default: ~2% slower prefill). The channels are found once on the calibration windows (the largest max
|x| over all their tokens) and recorded for the emitter.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from llmc.compiler import onnx_int8_linear as il
from llmc.errors import PassError
from llmc.kernels import reference as ref
from llmc.passes.layerwise import LayerwiseRunner, capture_inputs

log = logging.getLogger(__name__)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def outlier_count(in_features: int, wanted: int) -> int | None:
    """The most outlier channels, at most `wanted`, that the op takes for in_features (None: no count fits)."""
    for count in range(wanted - wanted % il.OUTLIER_ALIGN, -1, -il.OUTLIER_ALIGN):
        if il.supports(in_features, count):
            return count
    return None


class ActivationOutliers:
    """Record ir.outlier_channels: linear name -> its outlier input channels (int64, ascending)."""

    name = "act_outliers"

    def __init__(self, windows, channels: int = 128):
        self.windows, self.channels = windows, channels

    def check(self, ir) -> None:
        if self.channels % il.OUTLIER_ALIGN:
            raise PassError(f"act_outliers: channels {self.channels} is not a multiple of {il.OUTLIER_ALIGN}")

    def _choose(self, ir, name: str, amax: torch.Tensor, gains: dict) -> None:
        count = outlier_count(amax.numel(), self.channels)
        if count is None:
            return
        order = torch.argsort(amax, descending=True)
        ir.outlier_channels[name] = np.sort(order[:count].numpy()).astype(np.int64)
        # how much finer the int8 step gets (supports() leaves at least one inlier)
        gains[name] = float(amax.max()) / max(float(amax[order[count]]), 1e-12)

    @torch.no_grad()
    def run(self, ir) -> dict:
        runner = LayerwiseRunner(ir.model, self.windows)
        x, gains = runner.embed(), {}
        layers = ir.model.layers
        for index, layer in enumerate(layers):
            with capture_inputs(layer, LINEARS) as captured:
                x = runner.layer(layer, x)  # [S*T, hidden]
            for linear in LINEARS:
                self._choose(ir, f"layers.{index}.{linear}", captured[linear].abs().amax(0), gains)
            log.info("    act_outliers: layer %d/%d", index + 1, len(layers))
        head_input = ref.rms_norm(x, ir.model.norm, ir.model.geo.rms_norm_eps)
        self._choose(ir, "lm_head", head_input.abs().amax(0), gains)
        values = np.array(list(gains.values()) or [1.0])
        return {"channels": self.channels, "calibration_windows": list(self.windows.shape),
                "linears": len(ir.outlier_channels), "step_gain_median": round(float(np.median(values)), 2),
                "step_gain_max": round(float(values.max()), 2),
                "per_linear": {k: {"channels": v.tolist(), "step_gain": round(gains[k], 2)}
                               for k, v in ir.outlier_channels.items()}}
