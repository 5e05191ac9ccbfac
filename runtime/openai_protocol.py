"""OpenAI-compatible requests: strict JSON, strict schemas, and the parameters llmc refuses.

Everything a client can send ends here as a validated request or a RequestError naming the field:
no coercion of strings to numbers or booleans, no NaN/Infinity, no unknown parameters, and the
parameters llmc does not implement accepted only at their neutral values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmc.errors import RequestError
from llmc.runtime.sequence import SamplingParams, StructuredOutput
from llmc.runtime.tool_protocol import Tool, ToolCall, ToolChoice

MAX_JSON_DEPTH = 32  # no valid request nests deeper than ~6
MAX_STOP_CHARS = 256  # stop strings are checked on every token: keep that cheap
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default limit)
INT64 = 2**63

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# -- JSON ------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (send a finite number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """The body as strict JSON: RequestError for malformed JSON, NaN/Infinity, deep nesting, bad Unicode."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN, too many digits
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    _check_tree(body, "", 0)
    return body


def _check_tree(value: Any, path: str, depth: int) -> None:
    """Depth and text checks over the whole body, with the path of the offending value."""
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"{path}: nested more than {MAX_JSON_DEPTH} levels deep", path)
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RequestError(f"{path or 'body'}: the text holds a lone UTF-16 surrogate at character "
                                   f"{err.start}, which is not Unicode text; send valid UTF-8", path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            _check_tree(key, where, depth + 1)
            _check_tree(item, where, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_tree(item, f"{path}.{i}" if path else str(i), depth + 1)


# -- schemas ---------------------------------------------------------------------------------------
def _is_token_id(value: Any) -> bool:
    return type(value) is int  # noqa: E721 - bool is an int subclass and is not a token id


class StreamOptions(BaseModel):
    """stream_options: include_usage adds a final usage chunk."""

    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool | None = None


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: the schema the output must validate against."""

    model_config = _STRICT
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: text, any JSON object, or JSON of a schema."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (Lark or GBNF)."""

    model_config = _STRICT
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    def constraint(self) -> StructuredOutput:
        given = {name: value for name, value in (("json", self.json_), ("regex", self.regex),
                                                  ("choice", self.choice), ("grammar", self.grammar))
                 if value is not None}
        if len(given) != 1:
            raise RequestError("structured_outputs: give exactly one of json, regex, choice, grammar",
                               "structured_outputs")
        (kind, value), = given.items()
        if kind == "json":
            return StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
        return StructuredOutput(kind, json.dumps(value) if kind == "choice" else value)


class _SamplingRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0: completions with echo (score the prompt)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: no top-k cut (vLLM's -1 accepted)
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = Field(default=None, json_schema_extra={"anyOf": [  # the schema /openapi.json shows
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS},
        {"type": "null"}]})
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None  # extension: each choice also carries its token ids
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Accepted and ignored: they do not change what is generated.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Not implemented: accepted at their neutral values only (see check_supported).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) >= INT64:
                raise ValueError(f"the key {key[:20]!r} is not a token id (send token ids as strings: {{\"42\": 5}})")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}; allowed: -100 to 100")
        return value

    def _neutral(self) -> dict[str, bool]:
        """Each unimplemented parameter: whether its value is neutral (the same as leaving it out)."""
        return {"tools": not self.tools, "tool_choice": self.tool_choice in (None, "none", "auto"),
                "functions": not self.functions, "function_call": self.function_call in (None, "none", "auto")}

    def check_supported(self) -> None:
        """Refuse parameters llmc does not implement rather than ignoring them."""
        for name, neutral in self._neutral().items():
            if not neutral:
                raise RequestError(f"{name}: this parameter is not supported by llmc (only its neutral value is "
                                   "accepted)", name)

    def structured(self) -> StructuredOutput | None:
        """The output constraint asked for (response_format or structured_outputs, not both)."""
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise RequestError("response_format and structured_outputs both constrain the output; send one",
                               "structured_outputs")
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput("json_object", json.dumps({"type": "object"}))
        if fmt.json_schema is None:
            raise RequestError("response_format.json_schema: required with type json_schema ({\"name\": ..., "
                               "\"schema\": {...}})", "response_format.json_schema")
        return StructuredOutput("json_schema", json.dumps(fmt.json_schema.schema_))

    def sampling_params(self, default_max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The runtime's SamplingParams for this request."""
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=max(self.top_k or 0, 0), top_p=1.0 if self.top_p is None else self.top_p,
                              seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=bool(self.ignore_eos),
                              n=self.n or 1, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              min_tokens=self.min_tokens or 0, stop_token_ids=tuple(self.stop_token_ids or ()),
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=self.repetition_penalty or 1.0,
                              logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                              structured=self.structured())

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Any = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
         "minItems": 1, "maxItems": 1}]})
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None  # the prompt before the completion (with logprobs: the prompt's own)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the top k of each token

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            if all(_is_token_id(v) for v in value):
                return value
            if all(isinstance(v, str) for v in value) or all(
                    isinstance(v, list) and all(_is_token_id(t) for t in v) for v in value):
                return value
        raise ValueError("prompt must be a string, a list of token ids, or a list holding one of either")

    def _neutral(self) -> dict[str, bool]:
        return {**super()._neutral(), "suffix": not self.suffix, "best_of": self.best_of in (None, self.n or 1)}

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens: 0 generates nothing; it is allowed only with echo (to score the "
                               "prompt), otherwise send max_tokens >= 1", "max_tokens")

    def sampling_params(self, default_max_tokens: int, logprobs=None, prompt_logprobs=None) -> SamplingParams:
        """logprobs: each token's top k; with echo, the prompt's too."""
        return super().sampling_params(default_max_tokens, self.logprobs,
                                       self.logprobs if self.echo and self.logprobs is not None else None)

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (batched prompts are refused)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError("prompt: send one prompt per request (a list of prompts is not supported)",
                                   "prompt")
            p = p[0]
        return p


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Any = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "null"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]})
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {i} must be an object with a string 'type'")
            if part["type"] != "text":
                raise ValueError(f"content part {i} is of type {part['type']!r}: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return value

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""

    def turn(self) -> dict:
        """The message as the chat template takes it."""
        turn = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


class ChatRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None

    def _neutral(self) -> dict[str, bool]:
        neutral = super()._neutral()
        del neutral["tools"], neutral["tool_choice"]  # implemented for chat
        return neutral

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise RequestError("tool_choice: a required or named tool choice needs tools", "tool_choice")

    @property
    def calls_tools(self) -> bool:
        """Whether tools are offered to the model (given, and tool_choice is not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether a call is forced, the function named or None for any): tool_choice required or named."""
        if isinstance(self.tool_choice, BaseModel):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required" and bool(self.tools), None

    def sampling_params(self, default_max_tokens: int, logprobs=None, prompt_logprobs=None) -> SamplingParams:
        """max_completion_tokens is the newer name of max_tokens; logprobs: true gives the top_logprobs."""
        params = super().sampling_params(default_max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        if self.max_completion_tokens and not self.max_tokens:
            params = dataclasses.replace(params, max_tokens=self.max_completion_tokens)
        return params


def _error(err: ValidationError) -> RequestError:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return RequestError(f"{path}: unknown parameter (llmc refuses parameters it does not implement)", path)
    return RequestError(f"{path}: {first['msg'].removeprefix('Value error, ')}", path)


def validate(model: type[BaseModel], body: Any) -> BaseModel:
    """A JSON body as `model`; RequestError with the field path otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise _error(err) from None


def parse_request(model: type[_SamplingRequest], body: Any) -> _SamplingRequest:
    """A generate request, validated, with the parameters llmc does not implement refused."""
    request = validate(model, body)
    request.check_supported()
    return request
