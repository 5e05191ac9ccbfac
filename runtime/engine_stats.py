"""EngineStats: one snapshot of an LLM's state and counters (LLM.stats()), what /metrics, `llmc bench` and
logs read instead of reaching into the scheduler, the block manager and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.runtime.block_manager import PrefixCacheStats
from llmc.runtime.speculative import SpecStats


@dataclass(slots=True)
class StepTiming:
    """Cumulative wall time of steps and of the engine calls inside them (the rest is host work)."""

    steps: int = 0
    total_s: float = 0.0
    engine_s: float = 0.0
    decode_steps: int = 0  # steps of one new token per sequence (no prompt chunk, no drafts)
    decode_s: float = 0.0
    constraint_s: float = 0.0  # grammar masks, penalties and bias applied to logits (and the grammar's advance)
    constrained_tokens: int = 0  # tokens sampled from logits so processed

    @property
    def host_fraction(self) -> float:
        """Share of step time spent outside the engine: scheduling, input preparation, sampling."""
        return 1.0 - self.engine_s / self.total_s if self.total_s else 0.0

    def since(self, before: StepTiming) -> StepTiming:
        """The counts and seconds after `before` was taken."""
        return StepTiming(self.steps - before.steps, self.total_s - before.total_s, self.engine_s - before.engine_s,
                          self.decode_steps - before.decode_steps, self.decode_s - before.decode_s,
                          self.constraint_s - before.constraint_s,
                          self.constrained_tokens - before.constrained_tokens)


@dataclass(frozen=True, slots=True)
class EngineCalls:
    """Engine calls of one graph (main or int8): how many, their tokens and seconds."""

    calls: int
    tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot (copies: later steps do not change it)."""

    running: int  # sequences in the running set
    waiting: int  # sequences waiting to be admitted
    kv_usage: float  # allocated blocks / all blocks
    kv_waste: float  # allocated slots the running sequences do not use / allocated slots
    preemptions: int
    prefix_cache: PrefixCacheStats
    timing: StepTiming
    engine_calls: dict[str, EngineCalls]  # by graph
    speculation: SpecStats | None  # None where the LLM does not speculate
