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
from llmc.runtime.sequence import SamplingParams

MAX_JSON_DEPTH = 32  # no valid request nests deeper than ~6
MAX_STOP_CHARS = 256  # stop strings are checked on every token: keep that cheap
MAX_STOP_STRINGS = 4
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


class _SamplingRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: no top-k cut (vLLM's -1 accepted)
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None  # extension: each choice also carries its token ids
    # Accepted and ignored: they do not change what is generated.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Not implemented: accepted at their neutral values only (see check_supported).
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    response_format: dict[str, Any] | None = None
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

    def _neutral(self) -> dict[str, bool]:
        """Each unimplemented parameter: whether its value is neutral (the same as leaving it out)."""
        return {"presence_penalty": not self.presence_penalty, "frequency_penalty": not self.frequency_penalty,
                "logit_bias": not self.logit_bias,
                "logprobs": self.logprobs is None or self.logprobs is False,  # 0 asks for the sampled token's
                "response_format": self.response_format in (None, {"type": "text"}),
                "tools": not self.tools, "tool_choice": self.tool_choice in (None, "none", "auto"),
                "functions": not self.functions, "function_call": self.function_call in (None, "none", "auto")}

    def check_supported(self) -> None:
        """Refuse parameters llmc does not implement rather than ignoring them."""
        for name, neutral in self._neutral().items():
            if not neutral:
                raise RequestError(f"{name}: this parameter is not supported by llmc (only its neutral value is "
                                   "accepted)", name)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The runtime's SamplingParams for this request."""
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=max(self.top_k or 0, 0), top_p=1.0 if self.top_p is None else self.top_p,
                              seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=bool(self.ignore_eos),
                              n=self.n or 1)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Any
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None

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
        return {**super()._neutral(), "suffix": not self.suffix, "echo": not self.echo,
                "best_of": self.best_of in (None, self.n or 1)}

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
    content: Any = None
    name: str | None = None

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


class ChatRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def _neutral(self) -> dict[str, bool]:
        return {**super()._neutral(), "top_logprobs": not self.top_logprobs}

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """max_completion_tokens is the newer name of max_tokens."""
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            params = dataclasses.replace(params, max_tokens=self.max_completion_tokens)
        return params


def _error(err: ValidationError) -> RequestError:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return RequestError(f"{path}: unknown parameter (llmc refuses parameters it does not implement)", path)
    return RequestError(f"{path}: {first['msg'].removeprefix('Value error, ')}", path)


def parse_request(model: type[_SamplingRequest], body: Any) -> _SamplingRequest:
    """Validate a JSON body; RequestError with the field path otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        raise _error(err) from None
    request.check_supported()
    return request
