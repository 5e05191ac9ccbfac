"""Property: whatever a client sends, the server answers below 500 with JSON (or a well-formed SSE
stream), stays healthy, and frees every KV block afterwards (issue 12)."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.runtime.llm import LLM
from tests.server_harness import served, wait_idle

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

texts = (st.text(max_size=24) | st.text(st.characters(categories=["Cs", "Co", "Zs", "Cc"]), max_size=4)
         | st.sampled_from(["<|im_start|>", "<|endoftext|>", "\u0000", "\ufffd", "x" * 300]))
numbers = (st.integers(-3, 40) | st.integers() | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
           | st.sampled_from([1e-300, 5e-324, 2**63, -(2**63) - 1, 0.5]))
json_values = st.recursive(st.none() | st.booleans() | numbers | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=8)

COMMON = {
    "model": st.sampled_from(["tiny", "other", ""]),
    "max_tokens": st.integers(-2, 24) | numbers,
    "temperature": st.floats(-1, 3, allow_subnormal=False) | st.sampled_from([0, 1e-300, 5e-324, 2]),
    "top_p": st.floats(-0.5, 1.5, allow_subnormal=False) | st.sampled_from([1e-300, 1]),
    "top_k": st.integers(-3, 10**7),
    "n": st.integers(-1, 20),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.none() | texts | st.lists(texts, max_size=6),
    "seed": st.integers(),
    "ignore_eos": st.booleans(),
    "return_token_ids": st.booleans(),
    "logprobs": st.none() | st.booleans() | st.integers(-1, 5),
    "logit_bias": st.none() | st.dictionaries(st.integers(0, 300).map(str), st.floats(-5, 5, allow_subnormal=False),
                                              max_size=2),
    "presence_penalty": st.floats(-3, 3, allow_subnormal=False),
    "response_format": st.none() | st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "tools": st.none() | st.just([]),
}
COMPLETION = {**COMMON, "prompt": texts | st.lists(st.integers(-5, 400), max_size=12) | st.lists(texts, max_size=2)
              | st.lists(st.lists(st.integers(0, 300), max_size=4), max_size=2),
              "echo": st.booleans(), "best_of": st.integers(0, 3), "suffix": texts}
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts | numbers}),
                 max_size=2)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bad"]),
                                           "content": st.none() | texts | parts}), max_size=3)
CHAT = {**COMMON, "messages": messages, "max_completion_tokens": st.integers(-1, 24),
        "top_logprobs": st.integers(-1, 3)}


good_texts = st.text(max_size=24) | st.sampled_from(["<|im_start|>", "héllo wörld", "日本語", "x" * 256])
VALID_COMMON = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 24),
    "temperature": st.floats(0, 2, allow_subnormal=False) | st.sampled_from([1e-300, 5e-324]),
    "top_p": st.floats(1e-300, 1.0, allow_subnormal=False), "top_k": st.integers(-1, 10**7), "n": st.integers(1, 4),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.lists(good_texts.filter(bool), max_size=4), "seed": st.integers(-(2**63), 2**63 - 1),
    "ignore_eos": st.booleans(), "return_token_ids": st.booleans(), "logprobs": st.sampled_from([None, False]),
    "logit_bias": st.just({}), "presence_penalty": st.just(0), "response_format": st.just({"type": "text"}),
    "tools": st.just([]), "user": good_texts,
}
VALID_COMPLETION = {**VALID_COMMON, "echo": st.just(False), "suffix": st.just(""),
                    "prompt": good_texts.filter(bool) | st.lists(st.integers(0, 300), min_size=1, max_size=40)
                    | st.lists(good_texts.filter(bool), min_size=1, max_size=1)}
good_messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": good_texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": good_texts}),
                                     max_size=2)}), min_size=1, max_size=3)
VALID_CHAT = {**VALID_COMMON, "messages": good_messages}


def _bodies(schema: dict, valid: dict):
    """A valid body, a valid body with one field replaced by any JSON value (or an unknown key added), or
    a body drawn from the wider schema (mostly invalid)."""
    required = {"prompt": valid["prompt"]} if "prompt" in valid else {"messages": valid["messages"]}
    good = st.fixed_dictionaries(required, optional={k: v for k, v in valid.items() if k not in required})
    mutated = st.tuples(good, st.sampled_from(sorted(schema)) | texts, json_values).map(
        lambda t: {**t[0], t[1]: t[2]})
    return good | mutated | st.fixed_dictionaries({}, optional=schema)


def _raw(schema: dict, valid: dict):
    """Request bytes: JSON of a body, sometimes cut short or not an object at all."""
    as_json = _bodies(schema, valid).map(lambda b: json.dumps(b).encode())
    cut = st.tuples(as_json, st.integers(0, 60)).map(lambda t: t[0][:t[1]])
    return as_json | cut | json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=20)


@pytest.fixture(scope="module")
def fuzz_server(tiny_bundle):
    pool_tokens = 256  # a small pool: long requests end early (kv_cache_full) and the run stays fast
    llm = LLM(tiny_bundle, kv_cache_memory=pool_tokens * 512, max_num_seqs=4, max_num_batched_tokens=64)
    with served(llm) as (url, engine):
        yield url, engine


def _check_exchange(url: str, engine, path: str, raw: bytes) -> None:
    r = httpx.post(f"{url}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500, (raw, r.status_code, r.text)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        body = r.json()
        if r.status_code != 200:
            assert isinstance(body["error"]["message"], str)
        else:
            assert all(c["finish_reason"] in ("stop", "length", "kv_cache_full") for c in body["choices"]), body
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    wait_idle(engine)
    bm = engine.llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0


@SETTINGS
@given(raw=_raw(COMPLETION, VALID_COMPLETION))
def test_completions_never_5xx(fuzz_server, raw):
    _check_exchange(*fuzz_server, "/v1/completions", raw)


@SETTINGS
@given(raw=_raw(CHAT, VALID_CHAT))
def test_chat_never_5xx(fuzz_server, raw):
    _check_exchange(*fuzz_server, "/v1/chat/completions", raw)
