"""Logprobs in OpenAI's two shapes: completions (tokens, token_logprobs, top_logprobs, text_offset) and chat
(content: [{token, logprob, bytes, top_logprobs}]). Token strings are each token decoded alone, special tokens
included (a token holding part of a UTF-8 character shows U+FFFD, as in vLLM)."""

from __future__ import annotations

from llmc.runtime.sequence import TokenLogprob
from llmc.runtime.tokenizer import BundleTokenizer


class CompletionLogprobs:
    """Builds a completion choice's logprobs object, chunk by chunk (text_offset runs on across chunks)."""

    def __init__(self, tokenizer: BundleTokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset

    def block(self, entries: list[TokenLogprob], first_token: int | None = None) -> dict:
        """The logprobs of entries; first_token (echo: the prompt's first token) leads with no logprob."""
        body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first_token is not None:
            self._add(body, token_text(self.tokenizer, first_token), None, None)
        for e in entries:
            text = token_text(self.tokenizer, e.token)
            top = {token_text(self.tokenizer, t): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)  # the chosen token is always listed (vLLM)
            self._add(body, text, e.logprob, top)
        return body

    def _add(self, body: dict, text: str, logprob: float | None, top: dict | None) -> None:
        body["tokens"].append(text)
        body["token_logprobs"].append(logprob)
        body["top_logprobs"].append(top)
        body["text_offset"].append(self.offset)
        self.offset += len(text)


def token_text(tokenizer: BundleTokenizer, token: int) -> str:
    """One token decoded alone, special tokens included."""
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer: BundleTokenizer, entries: list[TokenLogprob]) -> dict:
    """A chat choice's (or delta's) logprobs: {"content": [...]}."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
