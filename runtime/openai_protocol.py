"""OpenAI-compatible request schemas and response builders (completions and chat completions)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmc.errors import RequestError
from llmc.runtime.sequence import SamplingParams

UNSUPPORTED = {"logit_bias": None, "suffix": None, "tools": None, "functions": None, "response_format": None,
               "best_of": None, "echo": False, "logprobs": None, "top_logprobs": None}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    return_token_ids: bool = False  # extension: each choice also carries its token ids

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def check_supported(self) -> None:
        """Refuse parameters llmc does not implement rather than ignoring them."""
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if extra.get(name, neutral) not in (neutral, None):
                raise RequestError(f"parameter '{name}' is not supported by llmc")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported by llmc")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The runtime's SamplingParams for this request."""
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos, n=self.n)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (batched prompts are refused)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError("send one prompt per request (a list of prompts is not supported)")
            p = p[0]
        return p


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, list):
            if any(part.get("type") != "text" for part in self.content):
                raise RequestError("only text content parts are supported")
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """max_completion_tokens is the newer name of max_tokens."""
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            params = dataclasses.replace(params, max_tokens=self.max_completion_tokens)
        return params


def parse_request(model: type[_Request], body: Any) -> _Request:
    """Validate a JSON body; RequestError with the field path otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"{path}: {first['msg']}") from None
    request.check_supported()
    return request


def new_id(prefix: str) -> str:
    """An OpenAI-style response id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, choices: list[dict], usage: dict | None, chat: bool, chunk: bool) -> dict:
    """A response or stream chunk envelope."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None, chat: bool, chunk: bool, first: bool = False,
           token_ids: list[int] | None = None) -> dict:
    """One choice of a response or a stream chunk."""
    if not chat:
        body = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    elif chunk:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        body = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        body = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    if token_ids is not None:
        body["token_ids"] = token_ids
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage block."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
