"""The onnxruntime backend: runs one engine step and writes the returned K/V into the pools."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from llmc.artifacts.bundle import Bundle
from llmc.artifacts.geometry import KV_LAYOUT, ModelGeometry
from llmc.errors import BundleError
from llmc.kernels.fused_cpu import register_fused_kernels
from llmc.runtime.kv_pool import KVPool
from llmc.runtime.step_inputs import StepInputs

log = logging.getLogger(__name__)


_GLOBAL_POOL_THREADS: int | None = None
STEP_INPUTS = ("input_ids", "positions", "block_tables", "context_lens", "query_start", "logits_index")
OUTPUTS = ("logits", "new_keys", "new_values")


def _use_global_thread_pool(num_threads: int) -> None:
    """Size onnxruntime's process-wide thread pool once (the first engine decides)."""
    global _GLOBAL_POOL_THREADS
    if _GLOBAL_POOL_THREADS is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(num_threads, 1)
        _GLOBAL_POOL_THREADS = num_threads
    elif num_threads != _GLOBAL_POOL_THREADS:
        log.warning("onnxruntime's thread pool already has %d threads in this process; %d requested",
                    _GLOBAL_POOL_THREADS, num_threads)


class OrtEngine:
    """One InferenceSession over the bundle's step graph."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None, draft: bool = False):
        """The bundle's target engine, or (draft=True) its speculative draft model's engine.

        Every session of the process runs on one global thread pool: a target and a draft session
        taking turns with pools of their own made each other ~2x slower on 2 cores (one pool's
        spinning threads starve the other's).
        """
        if draft:
            entry = bundle.manifest["speculative"]["draft"]["engine"]
            geometry = ModelGeometry.from_dict(bundle.manifest["speculative"]["draft"]["model"])
        elif "onnxruntime" in bundle.manifest["engines"]:
            entry, geometry = bundle.manifest["engines"]["onnxruntime"], bundle.geometry
        else:
            raise BundleError(f"{bundle.path} has no onnxruntime engine (it has: "
                              f"{', '.join(bundle.manifest['engines'])}); llmc's runtime runs onnxruntime engines: "
                              "rebuild with targets: [onnxruntime, ...]")
        layout = bundle.manifest["kv_cache"].get("layout")
        if layout != KV_LAYOUT:
            raise BundleError(f"{bundle.path} was built for KV pools laid out as {layout}; this runtime's engines "
                              f"read {KV_LAYOUT}: rebuild it with this llmc (`llmc build` of its model.yaml)")
        path = bundle.path / entry["dir"] / entry["graph"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        _use_global_thread_pool(num_threads or len(os.sched_getaffinity(0)))
        options.use_per_session_threads = False
        options.log_severity_level = 3
        fused = register_fused_kernels(options)
        self.attention = "llmc fused CPU kernel" if fused else "ONNX function body"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.geometry = geometry
        self.num_layers = geometry.num_layers
        self._bound_pool: KVPool | None = None
        self._io: ort.IOBinding | None = None
        log.info("onnxruntime %s engine loaded from %s (attention: %s)", ort.__version__, path, self.attention)

    def step(self, inputs: StepInputs, pool: KVPool) -> np.ndarray:
        """Run one step; returns logits [N, vocab] and updates the pools in place."""
        binding = self._binding(pool)
        for name in STEP_INPUTS:
            binding.bind_cpu_input(name, getattr(inputs, name))
        for name in OUTPUTS:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        logits, new_keys, new_values = binding.copy_outputs_to_cpu()
        pool.write(new_keys, new_values, inputs.slot_mapping)
        return logits

    def _binding(self, pool: KVPool) -> ort.IOBinding:
        """An IOBinding with the pool's 2 x layers arrays bound once (onnxruntime reads their memory in
        place): passing them as feeds cost up to ~0.1 ms per step (measured on a busy machine)."""
        if self._bound_pool is not pool:
            self._io = self.session.io_binding()
            for i in range(self.num_layers):
                self._io.bind_cpu_input(f"key_pool_{i}", pool.keys[i])
                self._io.bind_cpu_input(f"value_pool_{i}", pool.values[i])
            self._bound_pool = pool
        return self._io
