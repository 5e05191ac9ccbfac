"""The serving-side tokenizer: `tokenizers` for text <-> ids, jinja2 for the chat template."""

from __future__ import annotations

import re

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding, Tokenizer
from tokenizers.decoders import DecodeStream

from llmc.artifacts.bundle import Bundle
from llmc.errors import RequestError

LONG_TEXT_CHARS = 4096
_MARK = re.compile("\ue000(\\d+)\ue001")  # a message's place in a rendered template (private-use chars)


def _raise(message: str):
    raise RequestError(f"chat template: {message}")


class BundleTokenizer:
    """Encode, decode incrementally, and render the bundle's chat template."""

    def __init__(self, bundle: Bundle):
        meta = bundle.manifest.tokenizer
        self._path = bundle.tokenizer_dir / "tokenizer.json"
        self._tok = Tokenizer.from_file(str(self._path))
        self._plain: Tokenizer | None = None  # loaded when a message first spells a special token
        self._special_texts = [t.content for t in self._tok.get_added_tokens_decoder().values()
                               if t.special and t.content]
        self.eos_token_ids: list[int] = list(meta.eos_token_ids)
        self._meta = meta
        self._max_chars: int | None = None
        self._template = None
        if meta.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(meta.chat_template)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with the tokenizer's own special-token rules."""
        return _encode(self._tok, text).ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered conversation (with tools, for a template that reads them), where text
        inside message content that spells a special token ("<|im_start|>") stays plain text: a user cannot
        forge roles or turns."""
        messages = [{**m, "content": m.get("content") or ""} for m in messages]
        if not any(special in m["content"] for m in messages for special in self._special_texts):
            return self.encode(self.apply_chat_template(messages, tools=tools))
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        pieces = _MARK.split(self.apply_chat_template(marked, tools=tools))  # template text, index, text...
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
            raise RequestError("a message spells a special token (such as '<|im_start|>') and this bundle's chat "
                               "template does not place each message's content once, so that text cannot be kept "
                               "plain; remove the special-token text")
        if self._plain is None:
            plain = Tokenizer.from_file(str(self._path))
            plain.encode_special_tokens = True  # special-token text encodes as the plain text it is
            self._plain = plain
        parts = [_encode(self._tok, piece, False) if j % 2 == 0 else
                 _encode(self._plain, messages[int(piece)]["content"], False) for j, piece in enumerate(pieces)]
        return self._tok.post_process(Encoding.merge(parts)).ids

    @property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token covers (its vocabulary string is at least as long)."""
        if self._max_chars is None:
            self._max_chars = max(len(piece) for piece in self._tok.get_vocab(with_added_tokens=True))
        return self._max_chars

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        """Whether the bundle ships a chat template."""
        return self._template is not None

    @property
    def template_reads_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (otherwise llmc's default rendering does)."""
        return self._template is not None and "tools" in (self._meta.chat_template or "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render messages [{role, content}] into the prompt text the model was trained on."""
        if self._template is None:
            raise RequestError("this bundle has no chat template; send a plain prompt instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         bos_token=self._meta.bos_token or "",
                                         eos_token=self._meta.eos_token or "")
        except (TemplateError, TypeError, ValueError, KeyError) as err:  # the messages do not fit the template
            raise RequestError(f"chat template: these messages cannot be rendered ({err})") from None


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> Encoding:
    if len(text) > LONG_TEXT_CHARS:  # encode_batch releases the GIL; encode holds it throughout
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas without splitting characters: tokenizers'
    DecodeStream, which holds tokens back while their bytes do not yet form whole characters (one call a token;
    re-decoding a window of ids twice a token, as before, cost the host ~4 us a token)."""

    def __init__(self, tokenizer: BundleTokenizer):
        self._tok = tokenizer._tok
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        """The text that token completes (empty while a multi-byte character is incomplete)."""
        return self._stream.step(self._tok, token) or ""
