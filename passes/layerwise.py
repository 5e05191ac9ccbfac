"""Run the model one decoder layer at a time over calibration windows, capturing linear inputs.

Only one layer's activations live at once, so memory stays bounded on larger models. The layer
math is the model's own (DecoderLayer.forward over a paged cache laid out one block per window).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from llmc.kernels import reference as ref


class LayerwiseRunner:
    """Windows [S, T] -> per-layer forwards over the flattened tokens [S*T, hidden]."""

    def __init__(self, model, windows):
        self.model, self.windows = model, torch.as_tensor(windows, dtype=torch.int64)
        self.num_seqs, self.seq_len = windows.shape

    def embed(self) -> torch.Tensor:
        """Layer 0's input [S*T, hidden]."""
        with torch.no_grad():
            return self.model.embed(self.windows.reshape(-1))

    def _step(self, num_seqs: int) -> tuple:
        """Cos/sin and a paged step where window s is one sequence owning block s (block_size = T)."""
        t = self.seq_len
        positions = torch.arange(t).repeat(num_seqs)  # [S*T]
        i32 = torch.int32
        step = {"positions": positions, "slot_mapping": torch.arange(num_seqs * t),
                "block_tables": torch.arange(num_seqs, dtype=i32)[:, None],
                "context_lens": torch.full((num_seqs,), t, dtype=i32),
                "query_start": torch.arange(0, (num_seqs + 1) * t, t, dtype=i32)}
        return self.model.rope_cos[positions], self.model.rope_sin[positions], step

    def rope(self) -> tuple:
        """(cos, sin) [S*T, D] of a forward over all the windows, at each token's position."""
        cos, sin, _ = self._step(self.num_seqs)
        return cos, sin

    def _pools(self, num_seqs: int):
        shape = self.model.geo.pool_shape(num_seqs, self.seq_len)  # [NB, B, KVH, D]: a block a window
        return torch.zeros(shape), torch.zeros(shape)

    @torch.no_grad()
    def layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The whole decoder layer on x [S*T, hidden]."""
        cos, sin, step = self._step(self.num_seqs)
        return layer(x, cos, sin, step, *self._pools(self.num_seqs))

    @torch.no_grad()
    def attention(self, layer, h: torch.Tensor) -> torch.Tensor:
        """Attention (through o_proj) of normed h [s*T, hidden] for the first s windows."""
        num_seqs = h.shape[0] // self.seq_len
        cos, sin, step = self._step(num_seqs)
        return layer.attention(h, cos, sin, step, *self._pools(num_seqs))

    def norm_inputs(self, layer, x: torch.Tensor) -> torch.Tensor:
        """attn_norm(x): what q/k/v see."""
        return ref.rms_norm(x, layer.attn_norm, self.model.geo.rms_norm_eps)


@contextmanager
def capture_inputs(layer, names: tuple[str, ...]):
    """Record the input [tokens, in_features] of each named linear of `layer` during the forwards inside."""
    captured: dict[str, torch.Tensor] = {}
    handles = [getattr(layer, name).register_forward_pre_hook(
        lambda _mod, args, name=name: captured.__setitem__(name, args[0].detach())) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - reference|| / ||reference||."""
    return float((out - reference).norm() / reference.norm().clamp(min=1e-12))
