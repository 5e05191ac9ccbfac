"""Tool calling through the official openai client: a required or named call always parses against the function's
parameters (streamed as deltas too), the round trip call -> tool result -> answer works, and the parser, the
default rendering and the stream splitting behave as documented."""

import json
import random

import httpx
import jsonschema
import openai
import pytest

from llmc.runtime import tool_calls
from llmc.runtime.llm import LLM
from tests.helpers import write_tiny_checkpoint, write_yaml
from tests.server_harness import served

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny model with a 2048-token context: the tool listing alone is ~850 of the tiny tokenizer's tokens."""
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("tools")
    checkpoint = write_tiny_checkpoint(work / "ckpt", max_position_embeddings=2048)
    bundle = build(load_spec(write_yaml(work / "model.yaml", name="tiny", source=str(checkpoint), output="out")))
    with served(LLM(bundle, max_num_seqs=8)) as (url, engine):
        yield url, engine


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _check_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_round_trip_call_tool_result_answer(server):
    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in range(5):
        first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                               tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
    call = choice.message.tool_calls[0]
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21})}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME], max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_a_named_tool_choice_calls_that_function_and_streams_it(server):
    url, _ = server
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = _client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "time?"}],
                                               tools=[WEATHER, TIME], tool_choice=choice, max_tokens=80, temperature=0)
    _check_call(out.choices[0].message.tool_calls[0], names=("get_time",))
    chunks = list(_client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, TIME], tool_choice=choice,
        max_tokens=80, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls]
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)  # the name first, then arguments in fragments
    assert deltas[0].id and deltas[0].function.name == out.choices[0].message.tool_calls[0].function.name
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    streamed = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(streamed) == json.loads(out.choices[0].message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # no <tool_call> text leaks


@pytest.mark.parametrize("body, fragment", [
    ({"tool_choice": "required"}, "tool_choice: a required or named tool choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice: no tool named 'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name:"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice: a required or named tool call and response_format both constrain"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_are_400(server, body, fragment):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_parse_splits_content_and_calls():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
    content, calls = tool_calls.parse(text)
    assert content == "Sure." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    assert tool_calls.parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert tool_calls.parse("plain") == ("plain", [])


def test_stream_parser_holds_back_a_call_until_its_name_is_known():
    parser = tool_calls.StreamParser()
    assert parser.feed("Hello <tool", final=False) == ("Hello ", [])
    assert parser.feed('_call>{"name": "f", "arg', final=False) == ("", [])
    content, calls = parser.feed('uments": {}}</tool_call>', final=True)
    assert content == "" and calls[0]["index"] == 0 and calls[0]["function"] == {"name": "f", "arguments": ""}
    assert calls[1] == {"index": 0, "function": {"arguments": "{}"}}


def _stream(text: str, pieces: int, seed: int) -> tuple[str, list[dict]]:
    """Feed text to a StreamParser in random pieces; (all content, all call deltas)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), pieces - 1))
    parser, content, deltas = tool_calls.StreamParser(), "", []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        piece_content, piece_deltas = parser.feed(text[start:end], final=end == len(text))
        content += piece_content
        deltas += piece_deltas
    return content, deltas


@pytest.mark.parametrize("seed", range(20))
def test_streamed_call_deltas_add_up_to_the_parsed_calls(seed):
    """However the text is cut, the deltas concatenate to what parse() finds, names before arguments."""
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "S\\"ao }</", '
            '"days": [1, {"x": {}}]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
            '</tool_call>')
    _, expected = tool_calls.parse(text)
    content, deltas = _stream(text, pieces=1 + seed % 12 * 3, seed=seed)
    assert content.strip() == "Let me check."
    for index, call in enumerate(expected):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["function"]["name"] == call["function"]["name"] and mine[0]["id"].startswith("call_")
        streamed = "".join(d["function"]["arguments"] for d in mine)
        assert json.loads(streamed) == json.loads(call["function"]["arguments"])
        assert all("name" not in d["function"] for d in mine[1:])


def test_stream_parser_keeps_malformed_and_unfinished_calls_as_text():
    content, deltas = _stream("a <tool_call>{not json}</tool_call> b", pieces=5, seed=1)
    assert content == "a <tool_call>{not json}</tool_call> b" and deltas == []
    content, deltas = _stream('x <tool_call>{"arguments": {}, "name": "f"}</tool_call>', pieces=4, seed=2)
    assert content.strip() == "x" and deltas[0]["function"] == {"name": "f", "arguments": "{}"}  # sent whole
    content, deltas = _stream('<tool_call>{"name": "f", "arguments": {"q": "cut', pieces=3, seed=3)  # max_tokens
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"q": "cut' and content == ""


def test_default_rendering_puts_tools_and_tool_turns_in_the_template_s_roles():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
             {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]
    rendered = tool_calls.default_rendering(turns, [WEATHER])
    assert [t["role"] for t in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert rendered[3]["content"] == "<tool_response>\n21 C\n</tool_response>"
