"""quant_awq: activation-aware weight quantization, layer by layer over calibration windows.

Per decoder layer (following the paper and the reference implementation's behaviour):
  1. run the float layer, capturing each linear's input;
  2. for each group of linears sharing an input, search the scale exponent (kernels/awq.py) and
     fold 1/s into what produces that input (attn_norm -> q/k/v, mlp_norm -> gate/up,
     up_proj -> down_proj, v_proj -> o_proj when their shapes match, i.e. no GQA), so the graph
     gains no ops;
  3. optionally search a clip threshold per weight group (not for q/k, whose errors the softmax
     amplifies unevenly);
  4. round to the grid; the next layer's input is this layer's float output.
"""

from __future__ import annotations

import logging

import torch

from llmc.kernels.awq import apply_clip, search_clip, search_scale
from llmc.kernels.quant import GridConfig, quantize_rtn
from llmc.passes.layerwise import LayerwiseRunner, capture_inputs, relative_error
from llmc.passes.quant_common import LINEARS, check_unquantized, record, store, untie_lm_head

log = logging.getLogger(__name__)

CLIP_SAMPLE_TOKENS = 512


class QuantAWQ:
    """AWQ to the grid `cfg` (the LM head to `head`, if given), calibrated on token windows [S, T]."""

    name = "quant_awq"

    def __init__(self, cfg: GridConfig, head: GridConfig | None, windows: torch.Tensor, n_grid: int = 20,
                 duo_scaling: bool = True, clip: bool = True, loss_tokens: int = 4096):
        self.cfg, self.head, self.windows = cfg, head, windows
        self.n_grid, self.duo_scaling, self.clip, self.loss_tokens = n_grid, duo_scaling, clip, loss_tokens

    def check(self, ir) -> None:
        check_unquantized(ir, self.name)

    def _scale_groups(self, runner: LayerwiseRunner, layer, feats: dict) -> dict:
        """Search and fold the scales of the four input groups; returns the chosen exponents."""
        seq_len = runner.seq_len
        loss_seqs = max(1, min(runner.num_seqs, self.loss_tokens // seq_len))
        sample = torch.randperm(feats["gate_proj"].shape[0], generator=torch.Generator().manual_seed(0))
        sample = sample[: loss_seqs * seq_len]  # token rows for the per-token blocks (MLP, linears)
        h_attn = feats["q_proj"][: loss_seqs * seq_len]  # whole windows: attention needs their prefixes
        groups = [("qkv", [layer.q_proj, layer.k_proj, layer.v_proj], "q_proj", layer.attn_norm,
                   lambda: runner.attention(layer, h_attn)),
                  ("gate_up", [layer.gate_proj, layer.up_proj], "gate_proj", layer.mlp_norm,
                   lambda: layer.mlp(feats["gate_proj"][sample])),
                  ("down", [layer.down_proj], "down_proj", layer.up_proj,
                   lambda: layer.down_proj(feats["down_proj"][sample]))]
        if layer.v_proj.out_features == layer.o_proj.in_features:  # MHA: v's channels are o's inputs
            groups.append(("v_o", [layer.o_proj], "o_proj", layer.v_proj,
                           lambda: layer.o_proj(feats["o_proj"][sample])))
        ratios = {}
        for label, linears, feat, producer, block in groups:
            x = feats[feat]
            s, ratios[label], _ = search_scale(linears, x.abs().mean(0), block, self.cfg, self.n_grid,
                                               self.duo_scaling)
            with torch.no_grad():
                if isinstance(producer, torch.nn.Linear):  # producer output channels scale by 1/s
                    producer.weight.div_(s[:, None])
                    if producer.bias is not None:
                        producer.bias.div_(s)
                else:  # an RMSNorm weight
                    producer.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
            for name in {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"),
                         "down": ("down_proj",), "v_o": ("o_proj",)}[label]:
                feats[name] = feats[name] / s  # the inputs the scaled weights now see
        return ratios

    def run(self, ir) -> dict:
        ir.quantized = {}
        model = ir.model
        runner = LayerwiseRunner(model, self.windows)
        x = runner.embed()
        weight_errors, layer_errors, ratios = {}, {}, {}
        for i, layer in enumerate(model.layers):
            with capture_inputs(layer, LINEARS) as feats:
                out_fp = runner.layer(layer, x)  # [S*T, hidden]
            ratios[i] = self._scale_groups(runner, layer, feats)
            stride = max(1, feats["q_proj"].shape[0] // CLIP_SAMPLE_TOKENS)
            for attr in LINEARS:
                lin = getattr(layer, attr)
                if self.clip and attr not in ("q_proj", "k_proj"):
                    max_val = search_clip(lin.weight.data, feats[attr][::stride], self.cfg, self.n_grid)
                    lin.weight.data = apply_clip(lin.weight.data, max_val, self.cfg.group_size)
                weight_errors[f"layers.{i}.{attr}"] = store(ir, f"layers.{i}.{attr}", lin.weight,
                                                            quantize_rtn(lin.weight, self.cfg))
            layer_errors[f"layers.{i}"] = relative_error(runner.layer(layer, x), out_fp)
            x = out_fp
            log.info("    quant_awq: layer %d/%d (output error %.4f)", i + 1, len(model.layers),
                     layer_errors[f"layers.{i}"])
        if self.head:  # RTN, as the reference implementation leaves the head alone
            weight = untie_lm_head(model).weight
            weight_errors["lm_head"] = store(ir, "lm_head", weight, quantize_rtn(weight, self.head))
        return record(self.cfg, self.head, weight_errors, calibration_windows=list(self.windows.shape),
                      n_grid=self.n_grid, duo_scaling=self.duo_scaling, clip=self.clip,
                      per_layer_output_error=layer_errors, scale_exponents=ratios)
