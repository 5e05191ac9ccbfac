"""vLLM's /tokenize and /detokenize requests (strict, as the OpenAI ones)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from llmc.runtime.openai_protocol import _STRICT, ChatMessage

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
