"""The CUDA engine: the engine step contract on torch and llmc's Triton kernels, over the bundle's `cuda` target
(compiler/emit_torch.py). It shares the scheduler, block manager and sampler with the CPU engine; its KV pools
live on the GPU and it writes each step's keys and values into them before attending.

On a machine without CUDA it runs on the CPU under TRITON_INTERPRET=1 in float32: the tests check it there
against the onnxruntime engine. `LLM(bundle, device="cuda")` without CUDA is a clear error (check_cuda).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from llmc.artifacts.bundle import Bundle
from llmc.artifacts.geometry import ModelGeometry
from llmc.errors import BundleError, ConfigError
from llmc.runtime.step_inputs import StepInputs

log = logging.getLogger(__name__)

ATTENTION = "llmc Triton kernels"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def check_cuda() -> None:
    """ConfigError unless torch sees a CUDA device and triton imports."""
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here (torch "
                          f"{torch.__version__}); serve on the CPU (the default), or on a machine with an NVIDIA GPU "
                          "and a CUDA build of torch")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError("--device cuda needs triton (pip install triton)") from None


class TorchKVPool:
    """Per-layer K and V pools on the device, [layers, num_blocks, block_size, kv_heads, head_dim] (KV_LAYOUT)."""

    def __init__(self, geo: ModelGeometry, num_blocks: int, block_size: int, dtype: str = "float16",
                 device: str = "cuda"):
        if dtype not in TORCH_DTYPES:
            raise BundleError(f"the cuda engine keeps float16 or float32 KV pools, not {dtype}; rebuild with "
                              "kv_cache.dtype float16")
        shape = (geo.num_layers, *geo.pool_shape(num_blocks, block_size))
        self.keys = torch.zeros(shape, dtype=TORCH_DTYPES[dtype], device=device)
        self.values = torch.zeros_like(self.keys)
        self.num_blocks, self.block_size = num_blocks, block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if copies:
            src, dst = (torch.tensor(c, device=self.keys.device) for c in zip(*copies))
            self.keys[:, dst] = self.keys[:, src]
            self.values[:, dst] = self.values[:, src]


class TorchEngine:
    """One step: embed, per layer (norm, q/k/v, rotary, write K/V, paged attention, o, norm, SwiGLU MLP), the
    final norm and the LM head at logits_index."""

    attention = ATTENTION
    profiling = False

    def __init__(self, bundle: Bundle, device: str = "cuda", dtype: str | None = None):
        from safetensors.torch import load_file

        if "cuda" not in bundle.manifest.engines:
            raise BundleError(f"{bundle.path} has no cuda engine (it has: {', '.join(bundle.manifest.engines)}); "
                              "rebuild with targets: [onnxruntime, cuda]")
        entry = bundle.manifest.engines["cuda"]
        self.device, self.geometry = device, bundle.geometry
        self.num_layers = self.geometry.num_layers
        self.dtype = TORCH_DTYPES[dtype or ("float16" if device == "cuda" else "float32")]
        tensors = load_file(str(bundle.path / entry.dir / entry.weights), device=device)
        self.w = {name: t if t.dtype == torch.uint8 or name.startswith("rope.") else t.to(self.dtype)
                  for name, t in tensors.items()}
        self.untied_head = any(name.startswith("lm_head.") for name in self.w)  # else the embedding is the head
        self.path_counts = {"main": [0, 0]}  # [engine calls, tokens], as OrtEngine's
        self.path_seconds = {"main": 0.0}
        self.calibration_runs = {"main": 0}
        log.info("cuda engine loaded from %s on %s (%s; attention: %s)", entry.dir, device, self.dtype, ATTENTION)

    @property
    def gemm_path(self) -> str:
        return "torch (float16 matmul) and the Triton int4 GEMM"

    def calibrate_int8(self, pool) -> None:
        """Nothing to calibrate (the int8 graph is the CPU engine's)."""

    def end_profiling(self) -> dict[str, str]:
        return {}

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        from llmc.kernels.triton.int4_gemm import int4_matmul

        w = self.w
        if f"{name}.packed" in w:
            packed = w[f"{name}.packed"]
            y = int4_matmul(x, packed, w[f"{name}.scale"], w.get(f"{name}.zero"), packed.shape[2] * 2, x.shape[1])
        else:
            y = x @ w[f"{name}.weight"].T
        bias = w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.geometry.rms_norm_eps)).to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half rotation (Llama's): [T, heads, D] with cos / sin [T, 1, D / 2]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    @torch.no_grad()
    def step(self, inputs: StepInputs, pool: TorchKVPool) -> np.ndarray:
        """Run one step; returns logits [N, vocab] (float32, on the host) and writes K/V into the pools."""
        from llmc.kernels.triton.paged_attention import paged_decode, paged_prefill

        start = time.perf_counter()
        geo, w, dev = self.geometry, self.w, self.device
        ids = torch.from_numpy(inputs.input_ids).to(dev)
        positions = torch.from_numpy(inputs.positions).to(dev)
        slots = torch.from_numpy(inputs.slot_mapping).to(dev)
        tables = torch.from_numpy(inputs.block_tables).to(dev)
        lens = torch.from_numpy(inputs.context_lens).to(dev)
        starts = torch.from_numpy(inputs.query_start).to(dev)
        query_lens = np.diff(inputs.query_start)
        decode, max_context = bool((query_lens == 1).all()), int(inputs.context_lens.max())
        cos, sin = w["rope.cos"][positions][:, None], w["rope.sin"][positions][:, None]  # [T, 1, D/2]
        x = w["embed"][ids]  # [T, hidden]
        num_tokens, scale = len(ids), geo.head_dim ** -0.5
        flat = (geo.num_layers, -1, geo.num_kv_heads, geo.head_dim)  # one row per slot
        keys, values = pool.keys.view(flat), pool.values.view(flat)
        for i in range(geo.num_layers):
            p = f"layers.{i}"
            h = self._norm(x, w[f"{p}.attn_norm"])
            q = self._rope(self._linear(h, f"{p}.q_proj").view(num_tokens, geo.num_heads, geo.head_dim), cos, sin)
            k = self._rope(self._linear(h, f"{p}.k_proj").view(num_tokens, geo.num_kv_heads, geo.head_dim), cos, sin)
            v = self._linear(h, f"{p}.v_proj").view(num_tokens, geo.num_kv_heads, geo.head_dim)
            keys[i, slots], values[i, slots] = k.to(keys.dtype), v.to(values.dtype)
            if decode:
                attn = paged_decode(q, pool.keys[i], pool.values[i], tables, lens, scale, max_context=max_context)
            else:
                attn = paged_prefill(q, pool.keys[i], pool.values[i], tables, lens, starts, scale,
                                     int(query_lens.max()))
            x = x + self._linear(attn.reshape(num_tokens, -1), f"{p}.o_proj")
            h = self._norm(x, w[f"{p}.mlp_norm"])
            gate, up = self._linear(h, f"{p}.gate_proj"), self._linear(h, f"{p}.up_proj")
            x = x + self._linear(torch.nn.functional.silu(gate) * up, f"{p}.down_proj")
        h = self._norm(x[torch.from_numpy(inputs.logits_index).to(dev)], w["norm"])
        logits = self._linear(h, "lm_head") if self.untied_head else h @ w["embed"].T
        out = logits.float().cpu().numpy()
        self.path_counts["main"][0] += 1
        self.path_counts["main"][1] += num_tokens
        self.path_seconds["main"] += time.perf_counter() - start
        return out
