"""What an LLM runs a bundle with: the target engine and its KV pool (onnxruntime on the CPU, or the cuda engine),
a draft engine and pool for draft-model speculation, and speculative decoding's drafter and policy."""

from __future__ import annotations

import time
from pathlib import Path

from llmc.artifacts.bundle import Bundle
from llmc.runtime.block_manager import blocks_needed
from llmc.runtime.drafters import ModelDrafter, NgramDrafter
from llmc.runtime.engine_config import EngineConfig
from llmc.runtime.engine_ort import OrtEngine
from llmc.runtime.engine_torch_loader import cuda_engine
from llmc.runtime.kv_pool import KVPool, plan_kv_budget
from llmc.runtime.spec_policy import PRIOR_ACCEPTANCE, PRIOR_ACCEPTANCE_DRAFT, SpecPolicy
from llmc.runtime.speculation import Speculation
from llmc.runtime.step_inputs import Chunk, layout_step


def load_engines(bundle: Bundle, config: EngineConfig, profile_dir: str | Path | None = None):
    """(engine, pool, draft pool or None, Speculation or None) for config; the int8 graph calibrated and the
    adaptive policy's cost lines seeded."""
    geometry = bundle.geometry
    budget = plan_kv_budget(config.kv_cache_memory, config.kv_cache_fraction)
    spec = bundle.manifest.speculative if config.speculation else None
    drafts_with_model = spec is not None and spec.method == "draft"
    draft_engine = None
    if config.device == "cuda":
        engine, pool, draft_pool = cuda_engine(bundle, budget, drafts_with_model, config)
    else:
        engine = OrtEngine(bundle, config.num_threads, profile_dir=profile_dir)
        draft_engine = OrtEngine(bundle, config.num_threads, draft=True) if drafts_with_model else None
        pool, draft_pool = KVPool.from_budget(geometry, bundle.block_size, budget,
                                              draft=draft_engine and draft_engine.geometry, dtype=bundle.kv_dtype)
    speculation = None
    if spec:
        drafter = (ModelDrafter(draft_engine, draft_pool, geometry.vocab_size) if draft_engine
                   else NgramDrafter(spec.ngram.min_n, spec.ngram.max_n))
        adaptive = spec.adaptive if config.adaptive_speculation is None else config.adaptive_speculation
        policy = SpecPolicy(config.num_spec_tokens or spec.num_tokens, adaptive,
                            PRIOR_ACCEPTANCE_DRAFT if draft_engine else PRIOR_ACCEPTANCE)
        max_position = min(geometry.max_position, (draft_engine or engine).geometry.max_position)
        speculation = Speculation(drafter, policy, max_position)
    engine.calibrate_int8(pool)
    if speculation is not None and speculation.policy.adaptive:
        _time_engines(speculation, engine, pool, draft_pool)
    return engine, pool, draft_pool, speculation


def _time_engines(speculation: Speculation, engine, pool, draft_pool, sizes: tuple[int, ...] = (1, 64)) -> None:
    """Seed the adaptive policy's cost lines with timed steps of 1 and 64 tokens (a fresh pool's
    blocks are scratch space: no sequence reads a slot it has not written)."""
    policy = speculation.policy
    engines = [(engine, pool, policy.target)]
    if draft_pool is not None:
        engines.append((speculation.drafter.engine, draft_pool, policy.draft))
    for engine, pool, cost in engines:
        for tokens in sorted({min(t, pool.num_blocks * pool.block_size) for t in sizes}):
            chunk = Chunk([0] * tokens, 0, list(range(blocks_needed(tokens, pool.block_size))), 1)
            inputs = layout_step([chunk], pool.block_size)
            timings = []
            for _ in range(2):
                start = time.perf_counter()
                engine.step(inputs, pool)
                timings.append(time.perf_counter() - start)
            cost.add(tokens, min(timings))
