"""One generate request, from raw bytes to what the engine runs: parsed, validated, templated, tokenized and
its output constraint compiled (on a worker thread: a large request never stalls the event loop)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmc.errors import RequestError
from llmc.runtime import openai_protocol as oa
from llmc.runtime.http_guard import ClientError
from llmc.runtime.sequence import SamplingParams
from llmc.runtime.tool_calls import call_constraint, default_rendering


@dataclass(slots=True)
class Prepared:
    request: oa.CompletionRequest | oa.ChatRequest
    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None  # completions with echo: the prompt's text, before each choice's text
    tools: bool = False  # chat with tools offered: the model's text is parsed for tool calls


def check_model(requested: str | None, model_name: str) -> None:
    """404 for a model this server does not serve."""
    if requested and requested != model_name:
        raise ClientError(404, f"model '{requested}' does not exist; this server serves '{model_name}'",
                          "model_not_found")


def encode_conversation(tokenizer, turns: list[dict], tools: list[dict] | None) -> list[int]:
    """A conversation's token ids: tools and tool turns through the template where it reads them, otherwise
    through llmc's default rendering (runtime/tool_calls.py)."""
    has_tool_turns = any(t["role"] == "tool" or t.get("tool_calls") for t in turns)
    if (tools or has_tool_turns) and not tokenizer.template_reads_tools:
        return tokenizer.encode_chat(default_rendering(turns, tools or []))
    return tokenizer.encode_chat(turns, tools=tools)


def prompt_ids_of(llm, prompt: str | list[int] | None, turns: list[dict] | None,
                  tools: list[dict] | None = None) -> list[int]:
    """A completion prompt's or a conversation's token ids, refused early when far too long for the context."""
    context = llm.geometry.max_position
    if turns is not None:
        num_chars = sum(len(t["content"]) for t in turns) + len(str(tools or ""))
    else:
        num_chars = len(prompt) if isinstance(prompt, str) else 0  # token ids: validate_prompt counts them
    if num_chars > 2 * context * llm.tokenizer.max_chars_per_token:  # refuse before tokenizing all of it
        raise RequestError(f"the prompt has {num_chars:,} characters, far more than the model's context of "
                           f"{context} tokens can hold; shorten the prompt")
    ids = encode_conversation(llm.tokenizer, turns, tools) if turns is not None else prompt
    return llm.validate_prompt(ids)


def prepare(llm, raw: bytes, chat: bool, model_name: str, default_max_tokens: int) -> Prepared:
    """Parse, validate, template and tokenize one request; RequestError / ClientError say what is wrong."""
    req = oa.parse_request(oa.ChatRequest if chat else oa.CompletionRequest, oa.parse_json(raw))
    check_model(req.model, model_name)
    prompt = None if chat else req.single_prompt()
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if chat and req.calls_tools else None
    prompt_ids = prompt_ids_of(llm, prompt, [m.turn() for m in req.messages] if chat else None, tools)
    params = req.sampling_params(llm.geometry.max_position - len(prompt_ids) if chat else default_max_tokens)
    _check_token_ids(params, llm.geometry.vocab_size)
    field = "structured_outputs" if req.structured_outputs is not None else "response_format"
    forced, name = req.forced_tool() if chat else (False, None)
    if forced:
        if params.structured is not None:
            raise RequestError(f"tool_choice: a required or named tool call and {field} both constrain the output; "
                               "send one", "tool_choice")
        params, field = replace(params, structured=call_constraint(tools, name)), "tool_choice"
    if params.structured is not None:
        try:
            llm.grammars.matcher(params.structured)  # compiled here, off the event loop; cached for the engine
        except RequestError as err:
            raise RequestError(f"{field}: {err}", field) from None
    echo = None
    if not chat and req.echo:
        echo = prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    return Prepared(req, prompt_ids, params, echo, tools=tools is not None)


def check_token_ids(field: str, ids, vocab: int) -> None:
    """RequestError naming `field` unless every id is a token of the vocabulary."""
    if any(not 0 <= t < vocab for t in ids):
        raise RequestError(f"{field}: token ids must be in [0, {vocab})", field)


def _check_token_ids(params: SamplingParams, vocab: int) -> None:
    check_token_ids("logit_bias", [t for t, _ in params.logit_bias], vocab)
    check_token_ids("stop_token_ids", params.stop_token_ids, vocab)
