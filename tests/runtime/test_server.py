"""The OpenAI-compatible server: the official client, errors, auth, capacity, disconnects."""

import asyncio
import json

import httpx
import openai
import pytest

from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.server_harness import served, wait_idle


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    return LLM(tiny_bundle, kv_cache_memory="4MiB", max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def server(llm):
    with served(llm, api_key="sekret") as (url, engine):
        yield url, engine


def _client(url, key="sekret"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_completions(server, tiny_bundle):
    url, _ = server
    expected = LLM(tiny_bundle).generate(["The capital of"], SamplingParams(max_tokens=12, ignore_eos=True))
    out = _client(url).completions.create(model="tiny", prompt="The capital of", max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected[0].text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    chunks = list(_client(url).completions.create(model="tiny", prompt="The capital of", max_tokens=12,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat(server):
    url, _ = server
    messages = [{"role": "user", "content": "hello"}]
    full = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    stream = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    models = _client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_n_samples_over_http(server):
    url, _ = server
    out = _client(url).completions.create(model="tiny", prompt="Paged", max_tokens=6, temperature=1.0, seed=5, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"1": 200}}, 400, "logit_bias"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "The capital " * 400}, 400, "context is 512"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
])
def test_validation_errors_are_openai_style(server, body, status, fragment):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]


def test_malformed_json_and_auth(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                   headers={"Authorization": "Bearer sekret", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # health needs no key
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()


def test_disconnect_mid_stream_frees_blocks(server):
    url, engine = server

    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"prompt": "Paged", "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body,
                                     headers={"Authorization": "Bearer sekret"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break  # got a token: hang up

    asyncio.run(go())
    wait_idle(engine)
    assert engine.metrics.requests["aborted"] >= 1
    assert engine.llm.block_manager.num_free_blocks == engine.llm.block_manager.num_blocks


def test_metrics_exposition(server):
    """Three requests of its own (the test passes alone): each counted as finished."""
    url, engine = server
    auth = {"Authorization": "Bearer sekret"}
    wait_idle(engine)
    before = httpx.get(f"{url}/metrics", headers=auth).text
    for _ in range(3):
        body = {"prompt": "Paged", "max_tokens": 2, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30).status_code == 200
    wait_idle(engine)
    text = httpx.get(f"{url}/metrics", headers=auth).text
    for name in ("llmc_time_to_first_token_seconds_bucket", "llmc_inter_token_latency_seconds_count",
                 "llmc_e2e_request_latency_seconds_sum", "llmc_requests_running", "llmc_requests_waiting",
                 "llmc_kv_cache_usage_ratio", "llmc_prefix_cache_hit_rate", "llmc_preemptions_total",
                 "llmc_prompt_tokens_total", "llmc_generation_tokens_total"):
        assert name in text

    def finished(exposition: str) -> int:
        prefix = 'llmc_requests_total{status="finished"}'
        return int(float(next(line for line in exposition.splitlines() if line.startswith(prefix)).split()[-1]))

    assert finished(text) == finished(before) + 3
    # the exposition parses as Prometheus text, and every documented metric is in it
    from prometheus_client.parser import text_string_to_metric_families

    from llmc.runtime.metrics import COUNTERS, GAUGES
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name.removesuffix("_total") for name in COUNTERS} | set(GAUGES) <= set(families)
    assert families["llmc_generation_tokens"].samples[0].value >= 6


def test_concurrent_streams_each_get_every_token_before_their_end(server, tiny_bundle):
    """Tokens reach the event loop one step late (at the next step's engine call): a stream that ends while
    others still run gets its last tokens before its end, and each stream equals its request alone."""
    url, _ = server
    lengths = [2, 9, 5, 14]
    expected = [LLM(tiny_bundle).generate(["The capital of"], SamplingParams(max_tokens=n, ignore_eos=True))[0].text
                for n in lengths]

    async def stream(client, n):
        body = {"prompt": "The capital of", "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        text, finish = "", None
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"Authorization": "Bearer sekret"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        return text, finish

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[stream(client, n) for n in lengths])

    assert asyncio.run(go()) == [(text, "length") for text in expected]


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_count_steps_and_decode_steps(tiny_bundle):
    """One request of 6 tokens from a fresh server: its prompt's step, then 5 decode steps (one new token
    each), with their wall time and the engine's share of it."""
    with served(LLM(tiny_bundle, kv_cache_memory="4MiB")) as (url, engine):
        body = {"prompt": "The capital of", "max_tokens": 6, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        wait_idle(engine)
        text = httpx.get(f"{url}/metrics").text
    steps, decode_steps = _metric(text, "llmc_steps_total"), _metric(text, "llmc_decode_steps_total")
    assert (steps, decode_steps) == (6, 5)
    step_s, engine_s = _metric(text, "llmc_step_seconds_total"), _metric(text, "llmc_engine_seconds_total")
    assert 0 < _metric(text, "llmc_decode_step_seconds_total") < step_s and 0 < engine_s <= step_s


def test_over_capacity_is_429_with_retry_after(tiny_bundle):
    llm = LLM(tiny_bundle, max_num_seqs=1)
    with served(llm, max_waiting=0) as (url, engine):
        async def go():
            async with httpx.AsyncClient(timeout=30) as client:
                body = {"prompt": "Paged", "max_tokens": 200, "ignore_eos": True}
                return await asyncio.gather(*[client.post(f"{url}/v1/completions", json=body) for _ in range(4)])

        responses = asyncio.run(go())
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and 429 in codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["type"] == "rate_limit_error"
        wait_idle(engine)
