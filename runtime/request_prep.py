"""One generate request, from raw bytes to what the engine runs: parsed, validated, templated, tokenized and
its output constraint compiled (on a worker thread: a large request never stalls the event loop)."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.errors import RequestError
from llmc.runtime import openai_protocol as oa
from llmc.runtime.http_guard import ClientError
from llmc.runtime.sequence import SamplingParams


@dataclass(slots=True)
class Prepared:
    request: oa.CompletionRequest | oa.ChatRequest
    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None  # completions with echo: the prompt's text, before each choice's text


def check_model(requested: str | None, model_name: str) -> None:
    """404 for a model this server does not serve."""
    if requested and requested != model_name:
        raise ClientError(404, f"model '{requested}' does not exist; this server serves '{model_name}'",
                          "model_not_found")


def prompt_ids_of(llm, prompt: str | list[int] | None, messages: list[oa.ChatMessage] | None) -> list[int]:
    """A completion prompt's or a conversation's token ids, refused early when far too long for the context."""
    context = llm.geometry.max_position
    if messages is not None:
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        num_chars = sum(len(m["content"]) for m in turns)
    else:
        num_chars = len(prompt) if isinstance(prompt, str) else 0  # token ids: validate_prompt counts them
    if num_chars > 2 * context * llm.tokenizer.max_chars_per_token:  # refuse before tokenizing all of it
        raise RequestError(f"the prompt has {num_chars:,} characters, far more than the model's context of "
                           f"{context} tokens can hold; shorten the prompt")
    return llm.validate_prompt(llm.tokenizer.encode_chat(turns) if messages is not None else prompt)


def prepare(llm, raw: bytes, chat: bool, model_name: str, default_max_tokens: int) -> Prepared:
    """Parse, validate, template and tokenize one request; RequestError / ClientError say what is wrong."""
    req = oa.parse_request(oa.ChatRequest if chat else oa.CompletionRequest, oa.parse_json(raw))
    check_model(req.model, model_name)
    prompt = None if chat else req.single_prompt()
    prompt_ids = prompt_ids_of(llm, prompt, req.messages if chat else None)
    params = req.sampling_params(llm.geometry.max_position - len(prompt_ids) if chat else default_max_tokens)
    _check_token_ids(params, llm.geometry.vocab_size)
    if params.structured is not None:
        field = "structured_outputs" if req.structured_outputs is not None else "response_format"
        try:
            llm.grammars.matcher(params.structured)  # compiled here, off the event loop; cached for the engine
        except RequestError as err:
            raise RequestError(f"{field}: {err}", field) from None
    echo = None
    if not chat and req.echo:
        echo = prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    return Prepared(req, prompt_ids, params, echo)


def _check_token_ids(params: SamplingParams, vocab: int) -> None:
    biased = [t for t, _ in params.logit_bias]
    for field, ids in (("logit_bias", biased), ("stop_token_ids", params.stop_token_ids)):
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"{field}: token ids must be in [0, {vocab})", field)
