"""Soak: 64 concurrent streaming clients, a third hang up, a queue limit forces 429s; nothing is lost."""

import asyncio
import json
import random

import httpx
import numpy as np

from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import assert_same_or_near_tie
from tests.server_harness import served, wait_idle

NUM_CLIENTS = 64
MAX_TOKENS = 40
HANG_UP_MAX_TOKENS = 400  # a client that hangs up asks for far more, so it is surely still running when it goes


async def _client(url, prompt, disconnect_after):
    max_tokens = MAX_TOKENS if disconnect_after is None else HANG_UP_MAX_TOKENS
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "retry_after": response.headers.get("retry-after")}
            tokens, done, events = [], False, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                tokens += json.loads(line[6:])["choices"][0].get("token_ids", [])
                events += 1
                if disconnect_after is not None and events >= disconnect_after:
                    return {"status": "disconnected"}
            return {"status": 200, "tokens": tokens, "done": done}


def test_soak(tiny_bundle):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 300, size=int(n)).tolist() for n in rng.integers(2, 60, size=NUM_CLIENTS)]
    reference = LLM(tiny_bundle, max_num_seqs=1).generate(
        prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2))
    picker = random.Random(3)
    disconnect = [picker.randint(1, 5) if picker.random() < 1 / 3 else None for _ in prompts]
    llm = LLM(tiny_bundle, kv_cache_memory=120 * 2048, max_num_seqs=16, max_num_batched_tokens=64)
    with served(llm, max_waiting=16) as (url, engine):
        async def run_all():
            return await asyncio.gather(*[_client(url, p, d) for p, d in zip(prompts, disconnect)])

        results = asyncio.run(run_all())
        wait_idle(engine)
        statuses = [r["status"] for r in results]
        assert statuses.count(429) >= 1, statuses  # the queue limit really bit
        assert all(r["retry_after"] for r in results if r["status"] == 429)
        assert statuses.count("disconnected") >= 5
        completed = [(r, ref) for r, ref in zip(results, reference) if r["status"] == 200]
        assert len(completed) >= 16
        for result, ref in completed:
            assert result["done"]
            assert_same_or_near_tie(result["tokens"], ref.token_ids, ref.logprobs)
        bm = llm.block_manager
        assert bm.usage() == 0.0 and bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0
        assert engine.metrics.requests["rejected"] == statuses.count(429)
        assert engine.metrics.requests["aborted"] == statuses.count("disconnected"), statuses
