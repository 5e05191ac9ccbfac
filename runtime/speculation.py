"""Speculative decoding's per-sequence state in one place (LLM.speculation): the drafter, the policy (k,
admission, cost lines, acceptance), which decoding sequences speculate, and the counters. forget(seq) drops a
sequence from all of them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from llmc.runtime.scheduler import ScheduledSeq
from llmc.runtime.sequence import Sequence
from llmc.runtime.spec_policy import SpecPolicy
from llmc.runtime.speculative import Draft, SpecStats

MAX_DRAFT_LAG = 64  # an admitted sequence whose draft KV lags more than this stops speculating


class Speculation:
    """The drafter (a draft model or n-gram lookup), the policy and the counters of one LLM."""

    def __init__(self, drafter, policy: SpecPolicy, max_position: int):
        self.drafter, self.policy = drafter, policy
        self.max_position = max_position  # the shorter context of the target and the draft
        self.stats = SpecStats()
        self._speculating: dict[Sequence, bool] = {}  # admitted to speculation, per decoding sequence

    def draft_budget(self, running: list[Sequence]) -> Callable[[Sequence], int]:
        """Admit new decodes to speculation and pick this step's k; returns the step's draft budget: each
        sequence's draft tokens (Scheduler.schedule reserves KV slots for them where blocks are free)."""
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1 and s.output_ids]
        for seq in decoding:
            if seq not in self._speculating:
                self._speculating[seq] = self.policy.admit(seq, len(decoding), self.drafter.lag(seq))
            elif self._speculating[seq] and self.policy.adaptive and self.drafter.lag(seq) > MAX_DRAFT_LAG:
                self._speculating[seq] = False  # its draft fell too far behind (preempted, or k = 0 for long)
        speculating = [seq for seq in decoding if self._speculating[seq]]
        k = self.policy.choose_k(speculating)
        self.stats.last_k = k
        if decoding:
            self.stats.k_total += k
            if k and speculating:
                self.stats.steps_with_speculation += 1
            else:
                self.stats.steps_without += 1

        def slots(seq: Sequence) -> int:
            if not self._speculating.get(seq):
                return 0
            left = min(seq.params.max_tokens - len(seq.output_ids), self.max_position - seq.num_tokens)
            return max(0, min(k, left - 1))  # never draft past max_tokens or the context
        return slots

    def propose(self, scheduled: list[ScheduledSeq], rngs: Callable[[Sequence], np.random.Generator]
                ) -> dict[Sequence, Draft]:
        """Draft tokens for the scheduled decodes that have slots; attaches them to their ScheduledSeq."""
        items = [item for item in scheduled if item.spec_slots > 0]
        if not items:
            return {}
        start = time.perf_counter()
        drafts = self.drafter.propose(items, {item.seq: rngs(item.seq) for item in items})
        for item in items:
            item.set_draft(drafts[item.seq].tokens if item.seq in drafts else [])
        self.stats.draft_s += time.perf_counter() - start
        for tokens, seconds in self.drafter.step_costs:  # the policy's cost line: seconds ~ tokens
            self.policy.draft.add(tokens, seconds)
        self.drafter.step_costs.clear()
        return drafts

    def record_target(self, tokens: int, seconds: float, verified: bool) -> None:
        """A target engine call: the policy's cost line, and the verification time when it verified drafts."""
        self.policy.target.add(tokens, seconds)
        if verified:
            self.stats.verify_s += seconds

    def record_verification(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """One sequence's drafts checked by the target: the counters and its acceptance estimate."""
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.verifications += bool(proposed)
        if proposed:
            self.policy.acceptance.update(seq, proposed, accepted)

    def forget(self, seq: Sequence) -> None:
        """Drop a released sequence from the drafter, the policy and the admission map."""
        self.drafter.forget(seq)
        self.policy.acceptance.forget(seq)
        self._speculating.pop(seq, None)
