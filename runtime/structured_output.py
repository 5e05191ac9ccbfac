"""Structured outputs: a grammar per sequence (llguidance), its token mask each step, and its progress.

llguidance compiles JSON schemas, regexes, choices and Lark / GBNF grammars against the bundle's tokenizer
and computes a step's allowed-token bitmask in tens of microseconds; it needs neither torch nor transformers
(xgrammar, the other maintained engine, requires both), so the serving path stays torch-free.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from llmc.errors import RequestError
from llmc.runtime.sequence import StructuredOutput

log = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 64  # compiled matchers kept, by grammar text (a fresh matcher is a deep copy of one)
# JSON as OpenAI's strict mode writes it: no free whitespace between tokens (a model could otherwise emit
# whitespace until max_tokens), "," and ":" separators.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(RequestError):
    """A grammar the engine cannot compile, or a sequence whose grammar failed mid-generation."""


def _grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar for a StructuredOutput (RequestError naming the problem where it is malformed)."""
    import llguidance

    if so.kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(so.spec)
        except ValueError as err:
            raise GrammarError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except ValueError as err:
            raise GrammarError(f"choice must be a JSON list of strings: {err}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", so.spec)
    try:
        return llguidance.grammar_from("regex" if so.kind == "regex" else "grammar", so.spec)
    except ValueError as err:
        raise GrammarError(f"the {so.kind} cannot be compiled: {err}") from None


class GrammarCompiler:
    """Compiles StructuredOutputs against one tokenizer; thread-safe (the server compiles on worker threads)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: list[int]):
        self._path, self.vocab_size, self._eos = tokenizer_json, vocab_size, list(eos_token_ids)
        self._tokenizer = None  # llguidance.LLTokenizer, built on first use (~1 s for a 49k vocabulary)
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()  # (kind, spec) -> compiled matcher
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        import llguidance

        if self._tokenizer is None:
            log.info("building the structured-output tokenizer index (once per server)")
            self._tokenizer = llguidance.LLTokenizer(str(self._path), n_vocab=self.vocab_size,
                                                     eos_token=self._eos or None)
        return self._tokenizer

    def matcher(self, so: StructuredOutput):
        """A fresh llguidance.LLMatcher for so; GrammarError (HTTP 400) where it cannot be compiled."""
        import llguidance

        key = (so.kind, so.spec)  # a hit skips the grammar's text too (the server compiles, then the engine asks)
        with self._lock:
            template = self._cache.get(key)
            if template is None:
                template = llguidance.LLMatcher(self._llg_tokenizer(), _grammar_text(so), log_level=0)
                if template.is_error():
                    raise GrammarError(f"the {so.kind.replace('_', ' ')} cannot be compiled: {template.get_error()}")
                self._cache[key] = template
                if len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return template.deep_copy()


class SequenceGrammar:
    """One sequence's matcher: the mask of its next token, and the tokens it took."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def fork(self) -> SequenceGrammar:
        """An independent copy at the same point (the n > 1 samples of one prompt)."""
        return SequenceGrammar(self.matcher.deep_copy(), self.vocab_size)

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._check()
        return np.unpackbits(self._bitmask.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)

    def accept(self, token: int) -> None:
        """Advance past a sampled token."""
        if not self.matcher.consume_token(token):
            self._check()
            raise GrammarError(f"the grammar refused token {token}")

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens tokens."""
        if num_tokens and not self.matcher.rollback(num_tokens):
            self._check()

    @property
    def done(self) -> bool:
        """Whether the grammar is complete and allows nothing more (the sequence stops here)."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"structured output failed: {self.matcher.get_error()}")
