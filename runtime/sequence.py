"""Request state: sampling parameters, one sequence's tokens and progress, and its outputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmc.errors import RequestError

# Below this temperature sampling is greedy: logits / T would overflow into NaN (vLLM uses the same 1e-5).
GREEDY_TEMPERATURE = 1e-5


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the generated text: kind (STRUCTURED_KINDS) and its spec — a JSON schema (json_schema,
    json_object: {"type": "object"}), a regex, a JSON list of choices, or a Lark / GBNF grammar."""

    kind: str
    spec: str

    def __post_init__(self):
        if self.kind not in STRUCTURED_KINDS:
            raise RequestError(f"structured output kind {self.kind!r}: use one of {', '.join(STRUCTURED_KINDS)}")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position's log-probabilities under the model (before any sampling transform): the token there,
    its log-probability, and the `top` most likely tokens, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below GREEDY_TEMPERATURE) means greedy.

    Penalties, logit_bias, min_tokens and `structured` change the logits sampled from (in that order, then
    temperature, top-k, top-p); logprobs and prompt_logprobs report the model's own distribution.
    """

    max_tokens: int = 64  # 0 with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's log-probability and the top-k (0: the token's only)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    n: int = 1  # samples per prompt; they share the prompt's KV blocks (copy-on-write)
    min_tokens: int = 0  # EOS and stop_token_ids are banned before this many tokens
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens (OpenAI)
    repetition_penalty: float = 1.0  # > 1 divides positive / multiplies negative logits of prompt+output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    structured: StructuredOutput | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        scoring = self.max_tokens == 0 and self.prompt_logprobs is not None
        checks = [(self.max_tokens >= 1 or scoring, "max_tokens must be >= 1 (0 only to score the prompt, with "
                   f"prompt_logprobs), got {self.max_tokens}"),
                  (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                   "prompt_logprobs must be in [0, 20]"),
                  (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (0 < self.repetition_penalty <= 2, "repetition_penalty must be in (0, 2]"),
                  (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
                  (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
                  (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                  (all(s for s in self.stop), "stop strings must be non-empty"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
                  (1 <= self.n <= 16, f"n must be in [1, 16], got {self.n}")]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's token stream; computed tokens catch up with the tokens (vLLM v1)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    index: int = 0  # which of the request's n samples
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, with params.logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. (params.prompt_logprobs)
    num_preemptions: int = 0
    children: list["Sequence"] = field(default_factory=list)  # the other n - 1 samples, once forked
    pending: int | None = None  # the next token while an engine call in flight picks it: -(its row + 1) among
    # the in-flight picks (async scheduling, runtime/inflight.py); counted in num_tokens, not in output_ids

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end], without building the whole list (0 <= start <= end <= num_tokens); a pending
        token is its placeholder."""
        n = len(self.prompt_ids)
        if self.pending is not None and end == self.num_tokens:
            return self.tokens(start, end - 1) + [self.pending] if start < end else []
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length (a pending token included)."""
        return len(self.prompt_ids) + len(self.output_ids) + (self.pending is not None)

    @property
    def forks_next(self) -> bool:
        """Whether the next token starts the request's n > 1 samples (the others fork from this one then)."""
        return self.params.n > 1 and not self.output_ids and not self.children

    def ends_by_length(self, max_position: int) -> bool:
        """Whether its tokens (a pending one included) reach max_tokens or the context, max_position."""
        generated = len(self.output_ids) + (self.pending is not None)
        return generated >= self.params.max_tokens or self.num_tokens >= max_position

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt tokens still need their log-probabilities (so every prompt row needs logits)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def is_finished(self) -> bool:
        """True once a stop condition fired (or it was aborted)."""
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """The result (or a streamed delta) of one request."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # this delta's (or the whole output's) tokens
    index: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1..; the first delta (or the whole output)
