"""/openapi.json describes every route from the request models, and schemathesis, generating requests from
it (valid and invalid), finds no 5xx on any route; /tokenize, /detokenize and /v1/models in vLLM's shapes."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from llmc.runtime.llm import LLM
from tests.server_harness import served, wait_idle


@pytest.fixture(scope="module")
def server(tiny_bundle):
    # short generations: a fuzzed max_tokens would otherwise run each request to the end of the context
    with served(LLM(tiny_bundle, max_num_seqs=8), default_max_tokens=4) as (url, engine):
        yield url, engine


def test_the_spec_lists_every_route_and_its_request_models(server):
    url, _ = server
    spec = httpx.get(f"{url}/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                  "/v1/models", "/metrics", "/health", "/openapi.json"}
    completion = spec["components"]["schemas"]["CompletionRequest"]
    assert completion["additionalProperties"] is False and {"prompt", "logprobs", "echo"} <= set(
        completion["properties"])


def test_fuzzed_requests_never_get_a_5xx(server):
    """Every operation of the spec, 15 generated requests each (bounded: a few seconds on the tiny model)."""
    url, engine = server
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= {o.label for o in operations}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)
            wait_idle(engine, timeout=60)
        fuzz()


def test_tokenize_detokenize_and_models(server):
    url, engine = server
    tokenizer = engine.llm.tokenizer
    out = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}).json()
    assert out["tokens"] == tokenizer.encode("hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == engine.llm.geometry.max_position
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert httpx.post(f"{url}/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "hello world"}
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{url}/tokenize", json={"prompt": 5}).status_code == 400
    model = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert model["max_model_len"] == engine.llm.geometry.max_position
