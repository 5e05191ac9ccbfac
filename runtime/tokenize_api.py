"""vLLM's /tokenize and /detokenize: their requests (strict, as the OpenAI ones) and answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from llmc.runtime.openai_protocol import _STRICT, ChatMessage, validate
from llmc.runtime.request_prep import check_model, check_token_ids, encode_conversation

MAX_DETOKENIZE_TOKENS = 1 << 16


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt: its token ids, as /v1/completions would run it."""

    model_config = _STRICT
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # accepted; the bundle's tokenizer applies its own rules


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with messages: the conversation rendered by the chat template, then tokenized."""

    model_config = _STRICT
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool | None = None  # accepted; llmc's rendering always adds it
    add_special_tokens: bool | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize: the text of token ids."""

    model_config = _STRICT
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


def tokenize(llm, body: Any, model_name: str) -> dict:
    """A prompt's (or a templated conversation's) token ids, with the model's context."""
    chat = isinstance(body, dict) and "messages" in body
    req = validate(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    check_model(req.model, model_name)
    ids = (encode_conversation(llm.tokenizer, [m.turn() for m in req.messages], None) if chat
           else llm.tokenizer.encode(req.prompt))
    return {"count": len(ids), "max_model_len": llm.geometry.max_position, "tokens": ids, "token_strs": None}


def detokenize(llm, body: Any, model_name: str) -> dict:
    """The text of token ids."""
    req = validate(DetokenizeRequest, body)
    check_model(req.model, model_name)
    check_token_ids("tokens", req.tokens, llm.geometry.vocab_size)
    return {"prompt": llm.tokenizer.decode(req.tokens, skip_special_tokens=False)}
