"""The onnxruntime backend: runs one engine step and writes the returned K/V into the pools."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from llmc.artifacts.bundle import Bundle
from llmc.artifacts.geometry import ModelGeometry
from llmc.errors import BundleError
from llmc.runtime.kv_pool import KVPool
from llmc.runtime.step_inputs import StepInputs

log = logging.getLogger(__name__)


class OrtEngine:
    """One InferenceSession over the bundle's step graph."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None, draft: bool = False, spinning: bool = True):
        """The bundle's target engine, or (draft=True) its speculative draft model's engine.

        spinning=False makes idle worker threads sleep at once: needed when two sessions take turns
        (target and draft), where spinning threads of one slow the other down ~2x on a small CPU.
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
        path = bundle.path / entry["dir"] / entry["graph"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.geometry = geometry
        self.num_layers = geometry.num_layers
        log.info("onnxruntime %s engine loaded from %s", ort.__version__, path)

    def step(self, inputs: StepInputs, pool: KVPool) -> np.ndarray:
        """Run one step; returns logits [N, vocab] and updates the pools in place."""
        feeds = {"input_ids": inputs.input_ids, "positions": inputs.positions,
                 "block_tables": inputs.block_tables, "context_lens": inputs.context_lens,
                 "query_start": inputs.query_start, "logits_index": inputs.logits_index}
        for i in range(self.num_layers):
            feeds[f"key_pool_{i}"] = pool.keys[i]  # views: onnxruntime reads the pool memory directly
            feeds[f"value_pool_{i}"] = pool.values[i]
        logits, new_keys, new_values = self.session.run(None, feeds)
        pool.write(new_keys, new_values, inputs.slot_mapping)
        return logits
