"""Structured outputs: every constrained generation parses and validates against its schema (sampled, in
continuous batching, with n > 1, with prefix caching, with speculative decoding); regex, choice and grammar
constraints hold; a grammar that cannot compile is a RequestError."""

import json
import re

import jsonschema
import pytest

from llmc.errors import RequestError
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams, StructuredOutput
from tests.helpers import write_yaml

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "minimum": 10, "maximum": 999}},
        "required": ["x", "y"], "additionalProperties": False},
        "label": {"enum": ["left", "right", None]}}, "required": ["point", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                          "maximum": 1}},
     "required": ["ok", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "maximum": 99, "minimum": 0},
                                         "kind": {"const": "x"}}, "required": ["id", "kind"],
        "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
]


def _json(schema) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema))


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    return LLM(tiny_bundle, max_num_seqs=8)


@pytest.fixture(scope="module")
def ngram_llm(tmp_path_factory, tiny_checkpoint):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("ngram")
    spec = load_spec(write_yaml(work / "model.yaml", name="ng", source=str(tiny_checkpoint), output="out",
                                kv_cache={"block_size": 4},
                                speculative={"method": "ngram", "num_tokens": 4, "adaptive": False}))
    return LLM(build(spec), max_num_seqs=8)


def _check(outputs, schemas) -> None:
    for out, schema in zip(outputs, schemas, strict=True):
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_sixty_sampled_generations_validate_against_their_schemas(llm):
    """60 generations: 5 schemas x 6 seeds in two batches (the second hits the first's cached prompt blocks),
    each request with n = 2 samples."""
    outputs, schemas = [], []
    for seeds in (range(3), range(3, 6)):
        prompts, params = [], []
        for seed in seeds:
            for i, schema in enumerate(SCHEMAS):
                prompts.append([5 + i, 17, 33, 40] * 3)
                params.append(SamplingParams(max_tokens=200, temperature=1.0, seed=seed, n=2,
                                             structured=_json(schema)))
                schemas += [schema, schema]
        outputs += llm.generate(prompts, params)
    assert len(outputs) == 60 and llm.stats().prefix_cache.hit_tokens > 0
    _check(outputs, schemas)
    assert len({o.text for o in outputs}) > 20  # sampled, not one fixed text


def test_greedy_constrained_decoding_with_speculation_validates(ngram_llm):
    prompts = [[9, 9, 9, 9, 10, 9, 9, 9, 9, 10] * 2 for _ in SCHEMAS]
    outputs = ngram_llm.generate(prompts, [SamplingParams(max_tokens=200, structured=_json(s)) for s in SCHEMAS])
    _check(outputs, SCHEMAS)
    assert ngram_llm.speculation.stats.proposed > 0  # drafts were proposed and verified under the grammar
    unconstrained = ngram_llm.generate(prompts[:1], SamplingParams(max_tokens=30))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(unconstrained.text)


def test_json_object_regex_choice_and_grammar(llm):
    kinds = [(StructuredOutput("json_object", json.dumps({"type": "object"})), None),
             (StructuredOutput("regex", r"[a-c]{2,5}-\d{3}"), re.compile(r"[a-c]{2,5}-\d{3}")),
             (StructuredOutput("choice", json.dumps(["yes", "no", "maybe"])), re.compile("yes|no|maybe")),
             (StructuredOutput("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'),
              re.compile(r"\(\d(\+\d)*\)"))]
    # any JSON object: on a random model its strings run on, so a bias toward '"' and '}' closes them early
    bias = {llm.tokenizer.encode(c)[0]: 8.0 for c in ('"', "}")}
    for seed in range(3):
        outputs = llm.generate([[20, 21, 22]] * len(kinds), [
            SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=so,
                           logit_bias=bias if so.kind == "json_object" else ()) for so, _ in kinds])
        assert isinstance(json.loads(outputs[0].text), dict)
        for out, (_, pattern) in zip(outputs[1:], kinds[1:]):
            assert out.finish_reason == "stop" and pattern.fullmatch(out.text), out.text


@pytest.mark.parametrize("so, message", [
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}})),
     "cannot be compiled"),
    (StructuredOutput("regex", "(unclosed"), "cannot be compiled"),
    (StructuredOutput("grammar", "start: undefined_rule"), "cannot be compiled"),
    (StructuredOutput("choice", "[]"), "non-empty list"),
    (StructuredOutput("choice", "yes|no"), "JSON list of strings"),
])
def test_a_constraint_that_cannot_compile_is_a_request_error(llm, so, message):
    with pytest.raises(RequestError, match=message):
        llm.add_request([1, 2, 3], SamplingParams(structured=so))
    assert not llm.scheduler.has_unfinished()


def test_a_constraint_failing_mid_generation_ends_its_request_alone(llm):
    """The grammar refuses a token on the third step (as a matcher in an error state would): that request ends
    with finish reason 'error', the other one runs to its end, and every KV block is free again."""
    constrained = llm.add_request([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True,
                                                            structured=_json(SCHEMAS[0])))
    other = llm.add_request([4, 5, 6], SamplingParams(max_tokens=10, ignore_eos=True))
    grammar = llm._state[constrained].grammar
    accept, steps = grammar.accept, []

    def refuse_third(token):
        steps.append(token)
        accept(token if len(steps) < 3 else llm.tokenizer.encode("]")[0])  # ']' cannot follow '{"'
    grammar.accept = refuse_third
    while llm.scheduler.has_unfinished():
        llm.step()
    assert constrained.finish_reason == "error" and len(constrained.output_ids) == 3
    assert other.finish_reason == "length" and len(other.output_ids) == 10
    for seq in (constrained, other):
        llm.release(seq)
    assert llm.block_manager.usage() == 0


def test_a_compiled_constraint_is_reused_whole(llm, monkeypatch):
    """The server compiles a request's constraint off the event loop, then the engine asks for it again: the second
    time neither the grammar's text nor the matcher is built again, and each caller gets its own matcher."""
    from llmc.runtime import structured_output

    built = []
    text_of = structured_output._grammar_text
    monkeypatch.setattr(structured_output, "_grammar_text", lambda so: built.append(so) or text_of(so))
    so = StructuredOutput("regex", "[a-c]{2}z")  # not used by another test, so not cached yet
    first, second = llm.grammars.matcher(so), llm.grammars.matcher(StructuredOutput("regex", "[a-c]{2}z"))
    assert len(built) == 1 and first is not second
