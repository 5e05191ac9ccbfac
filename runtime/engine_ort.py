"""The onnxruntime backend: runs one engine step and writes the returned K/V into the pools."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llmc.artifacts.bundle import Bundle
from llmc.artifacts.geometry import KV_LAYOUT
from llmc.artifacts.manifest import DecodeGraph
from llmc.errors import BundleError
from llmc.kernels.fused_cpu import int4_available, int8_backend, register_fused_kernels
from llmc.runtime.kv_pool import KVPool
from llmc.runtime.step_inputs import Chunk, StepInputs, layout_step

log = logging.getLogger(__name__)


_GLOBAL_POOL_THREADS: int | None = None
STEP_INPUTS = ("input_ids", "positions", "block_tables", "context_lens", "query_start", "logits_index")
OUTPUTS = ("logits", "new_keys", "new_values")
# Steps of at least PREFILL_MIN_TOKENS tokens always run the int8 graph where a bundle has one (the int8
# kernel: ~1,000 GOP/s at 512 rows, fp32 Gemm ~150). Below that the crossover depends on the main graph's
# weights, so the engine measures it when it loads (calibrate_int8): decode steps of CALIBRATION_BATCHES
# sequences on both graphs. Measured on SmolLM2 (2 threads, 400 tokens of context): an fp32 main graph
# takes 29 ms at batch 1 and 73 ms at 16, the int8 graph 12 and 46 ms: int8 from one token on.
PREFILL_MIN_TOKENS = 16
FUSED_ATTENTION = "llmc fused CPU kernel"
ATTENTION_PLAN = "lengths"  # compiler/onnx_paged_attention.PLAN_FORMAT (the serving path imports no compiler)
INT8_LINEAR_FORMAT = "per-token+outliers"  # compiler/onnx_int8_linear.FORMAT
INT4_LINEAR_FORMAT = "int4 groups, float16 scale and offset; int8 activations per 32 channels"  # onnx_int4_linear
INT4_DECODE_ENV = "LLMC_INT4_DECODE"  # 0: run the MatMulNBits graph even where llmc.Int4Linear runs (A/B runs)
CALIBRATION_BATCHES = (1, 2, 4, 8)
CALIBRATION_CONTEXT = 128
CALIBRATION_REPEATS = 3  # timed runs per batch and graph, after one warm-up


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
    """An InferenceSession over the bundle's step graph (and one over its int8 prefill graph, if it has
    one and this CPU runs it)."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None, draft: bool = False,
                 profile_dir: str | Path | None = None):
        """The bundle's target engine, or (draft=True) its speculative draft model's engine. With
        profile_dir, onnxruntime profiles every step there (end_profiling returns the traces).

        Every session of the process runs on one global thread pool: a target and a draft session
        taking turns with pools of their own made each other ~2x slower on 2 cores (one pool's
        spinning threads starve the other's).
        """
        manifest = bundle.manifest
        if draft:
            entry, geometry = manifest.speculative.draft.engine, manifest.speculative.draft.model
        elif "onnxruntime" in manifest.engines:
            entry, geometry = manifest.engines["onnxruntime"], bundle.geometry
        else:
            raise BundleError(f"{bundle.path} has no onnxruntime engine (it has: "
                              f"{', '.join(manifest.engines)}); llmc's runtime runs onnxruntime engines: "
                              "rebuild with targets: [onnxruntime, ...]")
        layout = manifest.kv_cache.layout
        if layout != KV_LAYOUT:
            raise BundleError(f"{bundle.path} was built for KV pools laid out as {layout}; this runtime's engines "
                              f"read {KV_LAYOUT}: rebuild it with this llmc (`llmc build` of its model.yaml)")
        if entry.attention_plan != ATTENTION_PLAN:
            raise BundleError(f"{bundle.path} was built by an earlier llmc whose attention plan passed a padded mask "
                              "to every layer; this runtime's kernels read the plan's lengths: rebuild it with this "
                              "llmc (`llmc build` of its model.yaml)")
        self.int4_decode = _use_int4_decode(bundle, entry.decode)
        path = bundle.path / entry.dir / (entry.decode.graph if self.int4_decode else entry.graph)
        _use_global_thread_pool(num_threads or len(os.sched_getaffinity(0)))
        self.profiling = profile_dir is not None
        self.session, fused = _session(path, profile_dir and Path(profile_dir) / "main")
        self.attention = FUSED_ATTENTION if fused else "ONNX function body"
        self.int8_session = None  # the int8 graph: steps of at least int8_min_tokens tokens run here
        prefill = entry.prefill
        if prefill and prefill.linear_format != INT8_LINEAR_FORMAT:
            raise BundleError(f"{bundle.path} was built by an earlier llmc whose int8 graph scaled activations per "
                              "block of 64 channels; this runtime's Int8Linear takes one scale per token and the "
                              "calibrated outlier channels: rebuild it with this llmc (`llmc build` of its "
                              "model.yaml, which needs a calibration section for int8_prefill)")
        self.int8_backend = int8_backend() if prefill else None  # what llmc.Int8Linear runs on: AMX, AVX-512 VNNI
        if self.int8_backend:
            self.int8_session, _ = _session(bundle.path / entry.dir / prefill.graph,
                                            profile_dir and Path(profile_dir) / "int8")
        elif prefill:
            log.info("this CPU has neither AMX int8 tiles nor AVX-512 VNNI + BF16 (or llmc's kernels are off): every "
                     "step runs the main graph")
        self.int8_min_tokens = PREFILL_MIN_TOKENS  # steps of this many tokens or more run the int8 graph
        self.path_counts = {"main": [0, 0], "int8": [0, 0]}  # [engine calls, tokens] per path
        self.path_seconds = {"main": 0.0, "int8": 0.0}  # wall time of those calls
        self.calibration_runs = {"main": 0, "int8": 0}  # runs of each graph outside step() (not steps)
        self.geometry = geometry
        self.num_layers = geometry.num_layers
        self._bindings: dict[int, tuple[KVPool, ort.IOBinding]] = {}
        log.info("onnxruntime %s engine loaded from %s (attention: %s; GEMMs: %s)", ort.__version__, path,
                 self.attention, self.gemm_path)

    def step(self, inputs: StepInputs, pool: KVPool) -> np.ndarray:
        """Run one step; returns logits [N, vocab] and updates the pools in place."""
        num_tokens = len(inputs.input_ids)
        use_int8 = self.int8_session is not None and num_tokens >= self.int8_min_tokens
        session, path = (self.int8_session, "int8") if use_int8 else (self.session, "main")
        self.path_counts[path][0] += 1
        self.path_counts[path][1] += num_tokens
        start = time.perf_counter()
        logits = self.run_session(session, inputs, pool)
        self.path_seconds[path] += time.perf_counter() - start
        return logits

    def end_profiling(self) -> dict[str, str]:
        """Stop profiling; the trace file of each graph that has one ("main", "int8")."""
        traces = {"main": self.session.end_profiling()}
        if self.int8_session is not None:
            traces["int8"] = self.int8_session.end_profiling()
        return {name: path for name, path in traces.items() if path}

    @property
    def gemm_path(self) -> str:
        """Which graph's GEMMs run which steps, in words."""
        main = ("main graph (int4 llmc.Int4Linear, AVX-512 VNNI)" if self.int4_decode
                else "main graph (fp32 / MatMulNBits)")
        if self.int8_session is None:
            return main
        int8 = f"int8 {self.int8_backend} (llmc.Int8Linear)"
        if self.int8_min_tokens <= 1:
            return f"{int8} for every step"
        return f"{int8} for steps of >= {self.int8_min_tokens} tokens, else the {main}"

    def calibrate_int8(self, pool: KVPool) -> None:
        """Set int8_min_tokens from timed decode steps on both graphs: the smallest batch from which the
        int8 graph is faster at every measured size (a fresh pool's blocks are scratch space)."""
        if self.int8_session is None:
            return
        blocks = list(range(min(pool.num_blocks, -(-CALIBRATION_CONTEXT // pool.block_size))))
        context = len(blocks) * pool.block_size
        faster = {}
        for batch in CALIBRATION_BATCHES:
            inputs = layout_step([Chunk([0], context - 1, blocks, 1)] * batch, pool.block_size)
            seconds = {}
            for name, session in (("main", self.session), ("int8", self.int8_session)):
                self.run_session(session, inputs, pool)  # warm
                seconds[name] = min(_timed(self.run_session, session, inputs, pool) for _ in range(CALIBRATION_REPEATS))
                self.calibration_runs[name] += 1 + CALIBRATION_REPEATS
            faster[batch] = seconds["int8"] < seconds["main"]
            log.debug("decode batch %d: main graph %.1f ms, int8 graph %.1f ms", batch, 1e3 * seconds["main"],
                      1e3 * seconds["int8"])
        self.int8_min_tokens = PREFILL_MIN_TOKENS
        for batch in reversed(CALIBRATION_BATCHES):
            if not faster[batch]:
                break
            self.int8_min_tokens = batch
        log.info("int8 graph from %d tokens a step (measured on decode batches of %s)", self.int8_min_tokens,
                 ", ".join(map(str, CALIBRATION_BATCHES)))

    def run_session(self, session: ort.InferenceSession, inputs: StepInputs, pool: KVPool) -> np.ndarray:
        """One step on the given session (the main or the int8 graph)."""
        binding = self._binding(session, pool)
        for name in STEP_INPUTS:
            binding.bind_cpu_input(name, getattr(inputs, name))
        for name in OUTPUTS:
            binding.bind_output(name)
        session.run_with_iobinding(binding)
        logits, new_keys, new_values = binding.copy_outputs_to_cpu()
        pool.write(new_keys, new_values, inputs.slot_mapping)
        return logits

    def _binding(self, session: ort.InferenceSession, pool: KVPool) -> ort.IOBinding:
        """An IOBinding per session with the pool's 2 x layers arrays bound once (onnxruntime reads their
        memory in place): passing them as feeds cost up to ~0.1 ms per step (measured on a busy machine)."""
        bound = self._bindings.get(id(session))
        if bound is None or bound[0] is not pool:
            io = session.io_binding()
            for i in range(self.num_layers):
                io.bind_cpu_input(f"key_pool_{i}", pool.keys[i])
                io.bind_cpu_input(f"value_pool_{i}", pool.values[i])
            bound = self._bindings[id(session)] = (pool, io)
        return bound[1]


def _use_int4_decode(bundle: Bundle, decode: DecodeGraph | None) -> bool:
    """Whether the engine's main session runs the bundle's int4 decode graph (llmc.Int4Linear) instead of its
    MatMulNBits graph: where the bundle has one and the kernel runs here, unless LLMC_INT4_DECODE=0."""
    if decode is None:
        return False
    if decode.linear_format != INT4_LINEAR_FORMAT:
        raise BundleError(f"{bundle.path}'s int4 decode graph has a format this runtime does not read "
                          f"({decode.linear_format!r}): rebuild it with this llmc "
                          "(`llmc build` of its model.yaml)")
    if os.environ.get(INT4_DECODE_ENV, "1") == "0":
        log.info("%s=0: small steps run the MatMulNBits graph", INT4_DECODE_ENV)
        return False
    if not int4_available():
        log.info("this CPU has no AVX-512 VNNI (or llmc's kernels are off): small steps run the MatMulNBits graph")
        return False
    return True


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _session(path, profile_prefix: Path | None = None) -> tuple[ort.InferenceSession, bool]:
    """A CPU session over one step graph on the global thread pool; whether llmc's kernels are registered.
    With profile_prefix, onnxruntime's profiler writes its trace there."""
    options = ort.SessionOptions()
    if profile_prefix is not None:
        profile_prefix.parent.mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    options.log_severity_level = 3
    fused = register_fused_kernels(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), fused
