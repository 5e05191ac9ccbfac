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
from llmc.runtime.device_sampler import sample_rows
from llmc.runtime.device_staging import DevicePicks, DeviceStaging
from llmc.runtime.sampler import SamplingRows
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
        self._staging = DeviceStaging(device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if copies:
            src, dst = self._staging.to_device(*np.array(copies, dtype=np.int64).T.copy())  # [C] each, no sync
            self.keys[:, dst] = self.keys[:, src]
            self.values[:, dst] = self.values[:, src]


class TorchEngine:
    """One step: embed, per layer (add + norm, fused q/k/v, rotary + K/V write, paged attention, o, add + norm,
    fused gate/up, SwiGLU, down), the final norm and the LM head at logits_index. Ten kernel launches a layer
    (a split int4 GEMV's partial products are added up by the next kernel, not by launches of their own);
    decode steps replay CUDA graphs (runtime/cuda_graphs.py) unless cuda_graphs is False."""

    attention = ATTENTION
    profiling = False

    def __init__(self, bundle: Bundle, device: str = "cuda", dtype: str | None = None, cuda_graphs: bool = True,
                 max_num_seqs: int = 64):
        from safetensors.torch import load_file

        if "cuda" not in bundle.manifest.engines:
            raise BundleError(f"{bundle.path} has no cuda engine (it has: {', '.join(bundle.manifest.engines)}); "
                              "rebuild with targets: [onnxruntime, cuda]")
        entry = bundle.manifest.engines["cuda"]
        self.device, self.geometry = device, bundle.geometry
        self.num_layers = self.geometry.num_layers
        self.dtype = TORCH_DTYPES[dtype or ("float16" if device == "cuda" else "float32")]
        tensors = load_file(str(bundle.path / entry.dir / entry.weights), device=device)
        self.w = fuse_projections({name: t if t.dtype == torch.uint8 or name.startswith("rope.") else t.to(self.dtype)
                                   for name, t in tensors.items()}, self.num_layers)
        self.untied_head = any(name.startswith("lm_head.") for name in self.w)  # else the embedding is the head
        self.staging = DeviceStaging(device)
        self.graphs = None
        if cuda_graphs:  # without CUDA (the tests) its static buffers and padding run eagerly
            from llmc.runtime.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs)
        self.path_counts = {"main": [0, 0]}  # [engine calls, tokens], as OrtEngine's
        self.path_seconds = {"main": 0.0}
        self.calibration_runs = {"main": 0}
        log.info("cuda engine loaded from %s on %s (%s; attention: %s; decode CUDA graphs: %s)", entry.dir, device,
                 self.dtype, ATTENTION, "on" if self.graphs else "off")

    @property
    def gemm_path(self) -> str:
        return "torch (float16 matmul) and the Triton int4 GEMM"

    def calibrate_int8(self, pool) -> None:
        """Nothing to calibrate (the int8 graph is the CPU engine's)."""

    def end_profiling(self) -> dict[str, str]:
        return {}

    def linear(self, x: torch.Tensor, name: str, reduce: bool = True) -> torch.Tensor:
        """x [T, K] @ W^T (+ bias) -> [T, N], W int4-packed or float. reduce=False: an int4 W's split-K partial
        products [S, T, N] (int4_matmul), for a layer op that adds them up as it loads them."""
        from llmc.kernels.triton.int4_gemm import int4_matmul

        w = self.w
        bias = w.get(f"{name}.bias")
        if f"{name}.packed" not in w:
            y = x @ w[f"{name}.weight"].T
            return y if bias is None else y + bias
        packed = w[f"{name}.packed"]
        y = int4_matmul(x, packed, w[f"{name}.scale"], w.get(f"{name}.zero"), packed.shape[2] * 2, x.shape[1],
                        reduce=reduce)
        if bias is not None:  # once: into the first slice of partials
            (y if reduce else y[0]).add_(bias)
        return y

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                lens: torch.Tensor, starts: torch.Tensor, logits_index: torch.Tensor, pool: TorchKVPool,
                max_query_len: int, max_context: int, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The step on device tensors (no host sync: a CUDA graph captures it as is); logits [N, vocab] on the
        device. max_query_len 1: every sequence decodes one token. previous [P]: the picks of the calls still in
        flight (async scheduling); an input id -(j + 1) is their token j."""
        from llmc.kernels.triton.layer_ops import add_rms_norm, rope_write_kv, silu_mul
        from llmc.kernels.triton.paged_attention import paged_decode, paged_prefill

        geo, w, dtype = self.geometry, self.w, self.dtype
        eps, scale = geo.rms_norm_eps, geo.head_dim ** -0.5
        if previous is not None:
            ids = torch.where(ids < 0, previous[(-1 - ids).clamp(0, len(previous) - 1)], ids)  # [T]
        x = w["embed"][ids]  # [T, hidden]: the residual stream, updated in place by add_rms_norm
        h = add_rms_norm(x, w["layers.0.attn_norm"], eps)
        # each linear's output goes to a layer op that adds up an int4 GEMV's split-K partials as it loads them
        for i in range(geo.num_layers):
            p = f"layers.{i}"
            qkv = self.linear(h, f"{p}.qkv_proj", reduce=False)  # [T, (H + 2 KVH) * D], or partials [S, T, ...]
            q = rope_write_kv(qkv, w["rope.cos"], w["rope.sin"], positions, slots, pool.keys[i], pool.values[i],
                              geo.num_heads, geo.num_kv_heads, out_dtype=dtype)  # [T, H, D]
            if max_query_len == 1:
                attn = paged_decode(q, pool.keys[i], pool.values[i], tables, lens, scale, max_context=max_context)
            else:
                attn = paged_prefill(q, pool.keys[i], pool.values[i], tables, lens, starts, scale, max_query_len)
            h = add_rms_norm(self.linear(attn.view(len(ids), -1), f"{p}.o_proj", reduce=False), w[f"{p}.mlp_norm"],
                             eps, x, out_dtype=dtype)
            act = silu_mul(self.linear(h, f"{p}.gate_up_proj", reduce=False), out_dtype=dtype)  # [T, I]
            down = self.linear(act, f"{p}.down_proj", reduce=False)
            last = i == geo.num_layers - 1
            h = add_rms_norm(down, w["norm"] if last else w[f"layers.{i + 1}.attn_norm"], eps, x, out_dtype=dtype)
        h = h[logits_index]
        return self.linear(h, "lm_head") if self.untied_head else h @ w["embed"].T

    def _logits(self, inputs: StepInputs, pool: TorchKVPool, previous: torch.Tensor | None) -> torch.Tensor:
        """The step's logits [N, vocab] on the device: a decode graph's replay where one serves, else eager. Queued
        without waiting for the device (inputs go through self.staging)."""
        max_query_len = int(np.diff(inputs.query_start).max())
        max_context = int(inputs.context_lens.max())
        num_previous = 0 if previous is None else len(previous)
        every_row = len(inputs.logits_index) == len(inputs.input_ids)  # a graph gives every row's logits
        if (self.graphs is not None and max_query_len == 1 and every_row
                and self.graphs.serves(len(inputs.input_ids), max_context, num_previous)):
            return self.graphs.run(inputs, pool, previous)
        args = self.staging.to_device(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.block_tables,
                                      inputs.context_lens, inputs.query_start, inputs.logits_index)
        placeholders = previous is not None and len(inputs.input_ids) and inputs.input_ids.min() < 0
        return self.forward(*args, pool, max_query_len, max_context, previous if placeholders else None)

    @torch.no_grad()
    def step(self, inputs: StepInputs, pool: TorchKVPool, previous: torch.Tensor | None = None) -> np.ndarray:
        """Run one step; returns logits [N, vocab] (float32, on the host) and writes K/V into the pools.
        previous: as launch_sample's."""
        start = time.perf_counter()
        out = self._logits(inputs, pool, previous).float().cpu().numpy()
        self._count(len(inputs.input_ids), start)
        return out

    @torch.no_grad()
    def launch_sample(self, inputs: StepInputs, pool: TorchKVPool, rows: SamplingRows,
                      previous: torch.Tensor | None = None) -> DevicePicks:
        """Queue one step that picks each logits row's token on the device as rows say (runtime/device_sampler.py:
        argmax, or the sampler's draw for the row's uniform), and return at once: the picks [N] are on the device
        for the next step to read and reach the host when asked (DevicePicks.tokens). previous [P]: the picks of
        the calls still in flight, which input ids -(j + 1) stand for (async scheduling). N integers cross to the
        host instead of N x vocab floats (32 MB a step for a 128k vocabulary at batch 64)."""
        start = time.perf_counter()
        picks = self.staging.to_host(sample_rows(self._logits(inputs, pool, previous), rows, self.staging.to_device))
        self._count(len(inputs.input_ids), start)
        return picks

    def step_sample(self, inputs: StepInputs, pool: TorchKVPool, rows: SamplingRows) -> np.ndarray:
        """launch_sample, waiting for the tokens: int64 [N] on the host."""
        return self.launch_sample(inputs, pool, rows).tokens()

    def _count(self, num_tokens: int, start: float) -> None:
        self.path_counts["main"][0] += 1
        self.path_counts["main"][1] += num_tokens
        self.path_seconds["main"] += time.perf_counter() - start

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _stored_as(w: dict[str, torch.Tensor], name: str) -> tuple:
    """How a linear is stored: its tensor suffixes (less the bias) and their shapes past the output rows."""
    return tuple(sorted((key[len(name) + 1:], tuple(t.shape[1:])) for key, t in w.items()
                        if key.startswith(name + ".") and key != f"{name}.bias"))


def fuse_projections(w: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Concatenate each layer's q/k/v and gate/up weights along their output rows, so each group is one GEMM.
    The parts must be stored alike (all int4 with the same groups and zero-point kind, or all float), as llmc's
    quantization leaves them; a bundle where they differ is refused with a rebuild message."""
    for i in range(num_layers):
        for fused, parts in FUSED.items():
            names = [f"layers.{i}.{part}" for part in parts]
            stored = {_stored_as(w, name) for name in names}
            if len(stored) != 1:
                raise BundleError(f"layers.{i}: {', '.join(parts)} are stored in different formats, so the cuda "
                                  "engine cannot fuse them; rebuild the bundle with one quantization for them")
            suffixes = [suffix for suffix, _ in stored.pop()]
            rows = [w[f"{name}.{suffixes[0]}"].shape[0] for name in names]  # each part's output features
            for suffix in suffixes:
                w[f"layers.{i}.{fused}.{suffix}"] = torch.cat([w.pop(f"{name}.{suffix}") for name in names])
            biases = [w.pop(f"{name}.bias", None) for name in names]
            if any(b is not None for b in biases):  # a part without one adds zeros
                w[f"layers.{i}.{fused}.bias"] = torch.cat([
                    b if b is not None else torch.zeros(n, dtype=w["norm"].dtype, device=w["norm"].device)
                    for b, n in zip(biases, rows)])
    return w
