"""quant_rtn: round-to-nearest weight-only quantization of the decoder linears (and the LM head).

The torch model keeps the dequantized weights (fake quantization), so it stays the numerical
reference for the quantized engine; the codes go to the emitter in `ir.quantized`.
"""

from __future__ import annotations

import logging

from llmc.kernels.quant import GridConfig, quantize_rtn
from llmc.passes.quant_common import LINEARS, check_unquantized, record, store, untie_lm_head

log = logging.getLogger(__name__)


class QuantRTN:
    """Group-wise RTN on the grid `cfg` (the LM head on `head`, if given); needs no calibration data."""

    name = "quant_rtn"

    def __init__(self, cfg: GridConfig, head: GridConfig | None, mse: bool = False):
        self.cfg, self.head, self.mse = cfg, head, mse

    def check(self, ir) -> None:
        check_unquantized(ir, self.name)

    def run(self, ir) -> dict:
        ir.quantized = {}
        model = ir.model
        errors = {}
        for i, layer in enumerate(model.layers):
            for attr in LINEARS:
                weight = getattr(layer, attr).weight
                errors[f"layers.{i}.{attr}"] = store(ir, f"layers.{i}.{attr}", weight,
                                                       quantize_rtn(weight, self.cfg, self.mse))
            log.info("    quant_rtn: layer %d/%d", i + 1, len(model.layers))
        if self.head:
            weight = untie_lm_head(model).weight
            errors["lm_head"] = store(ir, "lm_head", weight, quantize_rtn(weight, self.head, self.mse))
        return record(self.cfg, self.head, errors, mse_grid=self.mse)
