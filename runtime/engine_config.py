"""EngineConfig: how a bundle is served (KV pool, scheduler limits, speculation, threads). One object for
`LLM`, `llmc run`, `llmc serve` and `llmc bench`: the CLI declares its options once, from these fields
(llmc/cli.py: engine_options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Defaults are `LLM`'s; each command sets its own where they differ (run: one sequence)."""

    kv_cache_memory: str | int | None = "1GiB"  # the KV pool's budget ("1GiB", bytes)
    kv_cache_fraction: float | None = None  # or a fraction of available memory
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 1024  # tokens per step
    enable_prefix_caching: bool = True  # share full KV blocks between prompts
    policy: str = "continuous"  # runtime/scheduler.POLICIES
    num_threads: int | None = None  # onnxruntime threads (default: the CPUs this process may use)
    speculation: bool = True  # False: ignore the bundle's speculative section
    num_spec_tokens: int | None = None  # k, the most tokens drafted per step (default: the bundle's)
    adaptive_speculation: bool | None = None  # None: the bundle's choice; False: always k tokens
    device: str = "cpu"  # cpu: the onnxruntime engine; cuda: the torch + Triton engine (the bundle's cuda target)
    cuda_graphs: bool = True  # device cuda: replay decode steps from CUDA graphs (False: vLLM's --enforce-eager)
    async_scheduling: bool = True  # device cuda: queue the next step before reading this one's tokens
