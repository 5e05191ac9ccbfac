"""Iteration-level scheduling: every step re-picks which sequences run and how many tokens each.

No prefill phase and no decode phase: each running sequence's computed tokens catch up with
its tokens, decodes first and prefill chunks after (policy "prefill-first": the other way round),
within a token budget and a sequence cap.
When the pool runs dry, the most recently admitted sequence is preempted (recompute).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Set
from dataclasses import dataclass, field

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.sequence import Sequence, SequenceStatus

DraftBudget = Callable[[Sequence], int]  # draft tokens a decoding sequence may carry this step


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: tokens [start, start + num_new_tokens).

    A decode may also carry drafted tokens after its last token (speculative decoding):
    spec_slots is how many the scheduler reserved KV slots for; spec_tokens are the ones drafted
    (set before the step runs; num_new_tokens counts them).
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    spec_slots: int = 0
    spec_tokens: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so it needs logits)."""
        return self.start + self.num_new_tokens - len(self.spec_tokens) == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Rows of logits this chunk needs: its last k + 1 where it completes its sequence (k drafts), and every
        row of a prompt chunk whose prompt tokens' logprobs are asked for."""
        if self.seq.wants_prompt_logprobs:
            return self.num_new_tokens
        return len(self.spec_tokens) + 1 if self.completes else 0

    def set_draft(self, tokens: list[int]) -> None:
        """Attach drafted tokens (at most spec_slots)."""
        self.spec_tokens = list(tokens[:self.spec_slots])
        self.num_new_tokens = 1 + len(self.spec_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    """What one step runs."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    out_of_memory: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the step


POLICIES = ("continuous", "static", "prefill-first")


class Scheduler:
    """FCFS admission, decode-first (or prefill-first) steps, chunked prefill, preemption by recompute.

    policy "continuous" admits new sequences at every step (Orca); "static" admits a batch only
    when the previous one has completely finished (the baseline continuous batching beats);
    "prefill-first" admits as "continuous" does but gives a step's budget to prefill chunks before
    decodes: a burst of prompts larger than the budget pauses decoding until its prefills are done
    (earlier first tokens, later next tokens for the sequences already decoding); otherwise the
    decodes take what the prefills leave.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 policy: str = "continuous"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; use one of {POLICIES}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (validated by the caller)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished, remove it from the queues and free its blocks."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)

    def update_from_output(self, item: ScheduledSeq, accepted: int = 0) -> None:
        """After the engine ran item: its computed tokens catch up (the whole chunk; with draft slots, its last
        token and the `accepted` drafts), rejected drafts' slots go back, and its full blocks enter the prefix
        cache."""
        seq = item.seq
        if item.spec_slots:
            seq.num_computed_tokens += 1 + accepted
            self.block_manager.trim(seq, seq.num_computed_tokens)
        else:
            seq.num_computed_tokens += item.num_new_tokens
        self.block_manager.cache_computed_blocks(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """Insert an already-running sequence (a forked sample) that owns its blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for seq, preempting the newest running sequences while it needs more: others newer
        than it, or else seq itself (it waits; the older ones keep their blocks, so two sequences can never
        take each other's blocks in turn). False when seq did not grow (preempted, or alone and too large)."""
        while (copies := self.block_manager.allocate(seq, num_tokens)) is None:
            if len(self.running) == 1:
                return False
            victim = max(self.running, key=lambda s: (s.arrival, s.index))
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        out.block_copies.extend(copies)
        return True

    def _spec_slots(self, seq: Sequence, want: int, budget: int, draft_budget: DraftBudget | None) -> int:
        """Draft-token slots for a decode: only from free blocks (speculation never preempts anyone)."""
        if draft_budget is None or want != 1:
            return 0
        slots = min(draft_budget(seq), budget - want)
        while slots > 0 and self.block_manager.allocate(seq, seq.num_computed_tokens + want + slots) is None:
            slots -= 1
        return max(slots, 0)

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        """FCFS from the waiting queue while sequences, budget and blocks allow; the budget left."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # a prompt to score runs whole: cached blocks would skip its rows' logits
            hit = seq.num_computed_tokens = 0 if seq.wants_prompt_logprobs else bm.claim_cached_prefix(seq)
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = bm.allocate(seq, seq.num_computed_tokens + want)
            if copies is None:
                bm.deallocate(seq)
                seq.num_computed_tokens = 0
                return budget
            bm.stats.queried_tokens += seq.num_tokens
            bm.stats.hit_tokens += hit
            out.block_copies.extend(copies)
            self.waiting.popleft()
            self.add_running(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, want))
            budget -= want
        return budget

    def _continue(self, seqs: list[Sequence], budget: int, out: SchedulerOutput,
                  draft_budget: DraftBudget | None = None) -> int:
        """Schedule running seqs in order within budget; the budget left."""
        for seq in seqs:
            if seq not in self.running or budget == 0:
                continue  # preempted by an earlier sequence of this step, or no budget left
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + want, out):
                if seq in self.running:
                    out.out_of_memory.append(seq)  # alone and still does not fit: the caller ends it
                continue
            slots = self._spec_slots(seq, want, budget, draft_budget)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, want, slots))
            budget -= want + slots
        return budget

    def schedule(self, draft_budget: DraftBudget | None = None, hold: Set[Sequence] = frozenset()) -> SchedulerOutput:
        """Pick this step's work. draft_budget: the draft tokens each decoding sequence may carry this step
        (speculative decoding's budget; reserved only from free blocks). hold: running sequences that sit this step
        out (async scheduling: their pending token is their last)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.policy == "static" and not self.running:
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.add_running(self.waiting.popleft())  # blocks come as each one is scheduled
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1 and s not in hold]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        if self.policy == "prefill-first":
            budget = self._admit(self._continue(prefilling, budget, out), out)
            self._continue(decoding, budget, out, draft_budget)
        else:
            budget = self._continue(decoding + prefilling, budget, out, draft_budget)
            if self.policy == "continuous":
                self._admit(budget, out)
        return out
