"""The click options of EngineConfig, declared once for `llmc run`, `serve` and `bench`."""

from __future__ import annotations

import functools

import click

from llmc.runtime.engine_config import EngineConfig
from llmc.runtime.scheduler import POLICIES


def engine_options(**defaults):
    """Add EngineConfig's options to a command (defaults: the command's own, EngineConfig field names) and pass
    the command one `engine: EngineConfig` instead of them."""
    base = EngineConfig(**defaults)
    options = [
        click.option("--kv-cache-memory", default=base.kv_cache_memory, show_default=True, help="KV-cache pool size."),
        click.option("--kv-cache-fraction", type=float, default=base.kv_cache_fraction,
                     help="Size the pool as a fraction of available memory."),
        click.option("--max-num-seqs", default=base.max_num_seqs, show_default=True, type=int,
                     help="Sequences per step."),
        click.option("--max-num-batched-tokens", default=base.max_num_batched_tokens, show_default=True, type=int,
                     help="Tokens per step."),
        click.option("--policy", type=click.Choice(POLICIES), default=base.policy, show_default=True,
                     help="prefill-first: prompts' chunks before decodes in each step (earlier first tokens in a "
                          "burst)."),
        click.option("--no-prefix-caching", is_flag=True, help="Disable KV block sharing between prompts."),
        click.option("--no-speculation", is_flag=True, help="Ignore the bundle's draft model / n-gram drafting."),
        click.option("--num-spec-tokens", type=click.IntRange(1, 16), default=None,
                     help="k, the most tokens drafted per step, 1..16 (default: the bundle's)."),
        click.option("--fixed-speculation", is_flag=True,
                     help="Always draft k tokens (no adaptive k / switching off)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=base.device, show_default=True,
                     help="cpu: the onnxruntime engine; cuda: the torch + Triton engine (a bundle built with "
                          "targets: [.., cuda])."),
        click.option("--enforce-eager", is_flag=True,
                     help="--device cuda: run decode steps eagerly, without CUDA graphs."),
        click.option("--no-async-scheduling", is_flag=True,
                     help="--device cuda: read each step's tokens before queuing the next (no host/GPU overlap)."),
    ]

    def decorate(command):
        @functools.wraps(command)
        def with_engine_config(**kwargs):
            engine = EngineConfig(
                kv_cache_memory=kwargs.pop("kv_cache_memory"), kv_cache_fraction=kwargs.pop("kv_cache_fraction"),
                max_num_seqs=kwargs.pop("max_num_seqs"), max_num_batched_tokens=kwargs.pop("max_num_batched_tokens"),
                policy=kwargs.pop("policy"), enable_prefix_caching=not kwargs.pop("no_prefix_caching"),
                num_threads=base.num_threads, speculation=not kwargs.pop("no_speculation"),
                num_spec_tokens=kwargs.pop("num_spec_tokens"),
                adaptive_speculation=False if kwargs.pop("fixed_speculation") else None, device=kwargs.pop("device"),
                cuda_graphs=not kwargs.pop("enforce_eager"), async_scheduling=not kwargs.pop("no_async_scheduling"))
            return command(engine=engine, **kwargs)

        for option in reversed(options):
            with_engine_config = option(with_engine_config)
        return with_engine_config

    return decorate
