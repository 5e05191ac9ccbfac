"""Request state: sampling parameters, one sequence's tokens and progress, and its outputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmc.errors import RequestError

# Below this temperature sampling is greedy: logits / T would overflow into NaN (vLLM uses the same 1e-5).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below GREEDY_TEMPERATURE) means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return the top-k log-probabilities of each generated step
    n: int = 1  # samples per prompt; they share the prompt's KV blocks (copy-on-write)

    def __post_init__(self):
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
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
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    text: str = ""
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0
    children: list["Sequence"] = field(default_factory=list)  # the other n - 1 samples, once forked

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_ids) + len(self.output_ids)

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
    logprobs: list[list[tuple[int, float]]] | None = None
    index: int = 0
