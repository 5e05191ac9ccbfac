"""The API real clients use, through the official openai client: logprobs and echo (lm-eval's loglikelihood
requests), structured outputs, sampling penalties, exact usage; and their bad input as 400s naming the field."""

import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.server_harness import served, wait_idle

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    return LLM(tiny_bundle, max_num_seqs=8)


@pytest.fixture(scope="module")
def server(llm):
    with served(llm) as (url, engine):
        yield url, engine


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_echo_with_max_tokens_zero_scores_the_prompt_as_lm_eval_asks(server, llm):
    """lm-evaluation-harness's local-completions loglikelihood request: echo, logprobs 1, max_tokens 0."""
    url, _ = server
    out = _client(url).completions.create(model="tiny", prompt="The capital of France", echo=True, logprobs=1,
                                          max_tokens=0, temperature=0)
    choice, ids = out.choices[0], llm.tokenizer.encode("The capital of France")
    reference = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
    assert choice.text == "The capital of France" and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([r.logprob for r in reference], abs=1e-6)
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])


def test_completion_logprobs_streamed_and_whole_agree(server):
    url, _ = server
    kwargs = dict(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = _client(url).completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in _client(url).completions.create(stream=True, **kwargs) if c.choices]
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs) and len(streamed) == 6
    assert all(max(top.values()) <= 0 and len(top) >= 2 for top in whole.logprobs.top_logprobs)


def test_chat_logprobs_and_top_logprobs(server):
    url, _ = server
    out = _client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, logprobs=True, top_logprobs=3, temperature=0)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob - 1e-9
        assert item.bytes == list(item.token.encode())
    assert "".join(i.token for i in content) == out.choices[0].message.content


def test_json_schema_response_format_and_structured_outputs(server):
    url, _ = server
    client = _client(url)
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a city?"}], max_tokens=100, temperature=1.0,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA,
                                                                               "strict": True}})
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    out = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=3,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert out.choices[0].finish_reason == "stop" and len(out.choices[0].text) == 6
    out = client.completions.create(model="tiny", prompt="pick:", max_tokens=20, stream=True,
                                    extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert "".join(c.choices[0].text for c in out if c.choices) in ("red", "green")


def test_usage_is_exact_in_the_final_stream_chunk(server, llm):
    url, _ = server
    chunks = list(_client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}], max_tokens=7,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 7 and usage.total_tokens == len(prompt) + 7


def test_penalties_and_logit_bias_reach_the_sampler(server):
    url, _ = server
    client = _client(url)
    body = dict(model="tiny", prompt="x", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    forced = client.completions.create(logit_bias={"77": 100}, **body)
    assert forced.choices[0].logprobs is None
    tokens = client.completions.create(logit_bias={"77": 100}, **{**body, "extra_body": {
        "ignore_eos": True, "return_token_ids": True}}).choices[0]
    assert tokens.model_extra["token_ids"] == [77] * 4
    spread = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **{
        **body, "max_tokens": 12, "extra_body": {"ignore_eos": True, "return_token_ids": True,
                                                 "repetition_penalty": 1.3, "min_tokens": 2}}).choices[0]
    ids = spread.model_extra["token_ids"]
    assert len(ids) == 12 and len(set(ids)) >= 8  # repeats are penalized


@pytest.mark.parametrize("path, body, fragment", [
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens: 0 generates nothing"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs:"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias: the key 'abc' is not a token id"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias: the bias of token 5 is 101"),
    ("completions", {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias: token ids must be in"),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids: token ids must be in"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty:"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": "(", "choice": ["a"]}}, "exactly one of"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": "(unclosed"}},
     "structured_outputs: the regex cannot be compiled"),
    ("completions", {"prompt": "x", "structured_outputs": {"grammar": "start: nope"}},
     "structured_outputs: the grammar cannot be compiled"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema: required"),
    ("chat/completions", {"response_format": {"type": "xml"}}, "response_format.type:"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}},
     "response_format: the json schema cannot be compiled"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs: needs logprobs: true"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs:"),
])
def test_bad_new_fields_are_400_naming_the_field(server, path, body, fragment):
    url, engine = server
    if path.startswith("chat"):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(f"{url}/v1/{path}", json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"], r.json()
    wait_idle(engine)
    assert engine.llm.block_manager.usage() == 0  # nothing leaked
