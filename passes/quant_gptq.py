"""quant_gptq: GPTQ layer by layer over calibration windows, sequential within each layer.

Linears are quantized in the order data flows (q/k/v, then o, then gate/up, then down); each
group's Hessian is collected with the earlier groups already quantized, and the next layer sees
this layer's quantized output, as the reference implementation does ("true sequential"). The
layer is run part by part (the model's own attention and MLP), so that costs one forward,
plus one float forward of the layer for the per-layer output error in the record.
"""

from __future__ import annotations

import logging

import torch

from llmc.kernels import reference as ref
from llmc.kernels.gptq import gptq_quantize, hessian
from llmc.kernels.quant import GridConfig
from llmc.passes.layerwise import LayerwiseRunner, capture_inputs, relative_error
from llmc.passes.quant_common import check_unquantized, record, store, untie_lm_head

log = logging.getLogger(__name__)

class QuantGPTQ:
    """GPTQ to the grid `cfg` (the LM head to `head`, if given), calibrated on token windows [S, T]."""

    name = "quant_gptq"

    def __init__(self, cfg: GridConfig, head: GridConfig | None, windows: torch.Tensor, damp: float = 0.01,
                 block_size: int = 128, act_order: bool = False, mse: bool = False):
        self.cfg, self.head, self.windows = cfg, head, windows
        self.damp, self.block_size, self.act_order, self.mse = damp, block_size, act_order, mse

    def check(self, ir) -> None:
        check_unquantized(ir, self.name)

    def _quantize(self, ir, prefix: str, linears: tuple[str, ...], layer, x: torch.Tensor, errors: dict) -> None:
        h = hessian(x)  # the linears share this input
        for attr in linears:
            lin = getattr(layer, attr)
            qw = gptq_quantize(lin.weight, h, self.cfg, self.damp, self.block_size, self.act_order, self.mse)
            errors[f"{prefix}.{attr}"] = store(ir, f"{prefix}.{attr}", lin.weight, qw)

    @torch.no_grad()
    def _quantize_layer(self, ir, runner: LayerwiseRunner, layer, prefix: str, x: torch.Tensor,
                        errors: dict) -> torch.Tensor:
        """Quantize one layer in data-flow order; returns its quantized output."""
        eps = layer.geo.rms_norm_eps
        h = ref.rms_norm(x, layer.attn_norm, eps)
        self._quantize(ir, prefix, ("q_proj", "k_proj", "v_proj"), layer, h, errors)
        with capture_inputs(layer, ("o_proj",)) as feats:
            runner.attention(layer, h)
        self._quantize(ir, prefix, ("o_proj",), layer, feats["o_proj"], errors)
        x = x + layer.o_proj(feats["o_proj"])
        h = ref.rms_norm(x, layer.mlp_norm, eps)
        self._quantize(ir, prefix, ("gate_proj", "up_proj"), layer, h, errors)
        with capture_inputs(layer, ("down_proj",)) as feats:
            layer.mlp(h)
        self._quantize(ir, prefix, ("down_proj",), layer, feats["down_proj"], errors)
        return x + layer.down_proj(feats["down_proj"])

    def run(self, ir) -> dict:
        ir.quantized = {}
        model = ir.model
        runner = LayerwiseRunner(model, self.windows)
        x = runner.embed()
        weight_errors, layer_errors = {}, {}
        for i, layer in enumerate(model.layers):
            out_fp = runner.layer(layer, x)  # [S*T, hidden]
            x = self._quantize_layer(ir, runner, layer, f"layers.{i}", x, weight_errors)
            layer_errors[f"layers.{i}"] = relative_error(x, out_fp)
            log.info("    quant_gptq: layer %d/%d (output error %.4f)", i + 1, len(model.layers),
                     layer_errors[f"layers.{i}"])
        if self.head:  # the head sees the final norm of the last layer's output
            head = untie_lm_head(model)
            h = hessian(ref.rms_norm(x, model.norm, model.geo.rms_norm_eps))
            qw = gptq_quantize(head.weight, h, self.head, self.damp, self.block_size, self.act_order, self.mse)
            weight_errors["lm_head"] = store(ir, "lm_head", head.weight, qw)
        return record(self.cfg, self.head, weight_errors, calibration_windows=list(self.windows.shape),
                      damp=self.damp, block_size=self.block_size, act_order=self.act_order, mse_grid=self.mse,
                      per_layer_output_error=layer_errors)
