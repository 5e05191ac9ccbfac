"""Serving runtime: engines, KV pool, block manager, scheduler, sampler, LLM API."""
