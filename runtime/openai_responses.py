"""OpenAI-compatible response bodies and stream chunks (completions and chat completions)."""

from __future__ import annotations

import time
import uuid


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """An OpenAI-style error object (a message quoting the client's invalid text stays encodable)."""
    def encodable(text: str | None) -> str | None:
        return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": encodable(message), "type": kind, "param": encodable(param), "code": code}}


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


def choice(index: int, text: str | None, finish_reason: str | None, chat: bool, chunk: bool, first: bool = False,
           token_ids: list[int] | None = None, finish_detail: str | None = None, logprobs: dict | None = None,
           tool_calls: list[dict] | None = None) -> dict:
    """One choice of a response or a stream chunk; finish_detail (an llmc extension) says why it ended early.
    With tool_calls, a chat choice's finish reason "stop" is "tool_calls"."""
    if tool_calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    if not chat:
        body = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    elif chunk:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        if tool_calls:
            delta["tool_calls"] = tool_calls
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        body = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        body["token_ids"] = token_ids
    if finish_detail is not None:
        body["finish_detail"] = finish_detail
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage block."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
