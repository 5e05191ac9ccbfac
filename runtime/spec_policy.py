"""Adaptive speculation: how many tokens to draft this step, from measured costs and acceptance.

Per step the policy picks one k in 0..k_max for the running decodes, maximising expected tokens
per second: sum over sequences of E[tokens | k] = (1 - a^(k+1)) / (1 - a) (a: the sequence's
acceptance rate), divided by the predicted time of the verify step over S*(k+1) tokens plus k
draft steps. Step times are least-squares lines over recent steps (seconds = fixed + per_token *
tokens), so when a large batch makes the target step compute-bound (time grows with tokens) or
acceptance is low, k drops — to 0, switching speculation off — instead of slowing the server.
A sequence is admitted to speculation at its first decode, when speculation pays at the current
batch size and the saving repays catching a draft model up on its prompt; sequences not admitted
never draft (under heavy load nothing is spent on the draft at all). Admitted sequences keep their
draft current; while k is 0 for them, one step in PROBE_EVERY drafts a single token to keep the
estimates fresh.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from llmc.runtime.sequence import Sequence

PRIOR_ACCEPTANCE = 0.6  # before a sequence has verified anything (n-gram lookup)
PRIOR_ACCEPTANCE_DRAFT = 0.9  # a paired draft model: the same family, usually a quantized copy
GLOBAL_DECAY = 0.98  # the drafter's acceptance over all sequences: the prior of a new sequence
PRIOR_WEIGHT = 2.0  # pseudo-observations behind the prior
DECAY = 0.9  # per verification: recent acceptance counts more
MIN_GAIN = 1.1  # speculate only for a predicted 10% more tokens/s: the cost lines are rough at the margin
PROBE_EVERY = 32  # after this many steps at k = 0, draft one token once: acceptance and costs drift


class StepCost:
    """seconds ~ fixed + per_token * tokens, fitted over the last `window` observed steps."""

    def __init__(self, window: int = 64):
        self.observations: deque[tuple[int, float]] = deque(maxlen=window)
        self._line: tuple[float, float] | None = None  # (fixed, per_token), refitted after an add

    def add(self, tokens: int, seconds: float) -> None:
        self.observations.append((tokens, seconds))
        self._line = None

    def predict(self, tokens: int) -> float:
        """Predicted seconds for a step of `tokens` tokens (0 until something was observed)."""
        if not self.observations:
            return 0.0
        if self._line is None:
            self._line = self._fit()
        fixed, per_token = self._line
        return fixed + per_token * tokens

    def _fit(self) -> tuple[float, float]:
        x = np.array([t for t, _ in self.observations], dtype=np.float64)
        y = np.array([s for _, s in self.observations], dtype=np.float64)
        if np.ptp(x) == 0:  # one step size seen so far: a flat line through it
            return float(y.mean()), 0.0
        slope, intercept = np.polyfit(x, y, 1)
        if slope < 0:  # noise: steps do not get cheaper with more tokens
            return float(y.mean()), 0.0
        return max(float(intercept), 0.0), float(slope)


class Acceptance:
    """Decayed counts of accepted draft tokens and of rejections, per sequence.

    A verification of m drafts that keeps a of them is a geometric trial: a successes, then one
    failure if a < m. The estimate of the per-token acceptance rate is successes / trials.
    """

    def __init__(self, prior: float = PRIOR_ACCEPTANCE):
        self.prior = prior
        self._counts: dict[Sequence, list[float]] = {}
        self._all = [0.0, 0.0]  # over every sequence, decayed more slowly

    def update(self, seq: Sequence, proposed: int, accepted: int) -> None:
        rejected = 1.0 if accepted < proposed else 0.0
        counts = self._counts.setdefault(seq, [0.0, 0.0])
        counts[0], counts[1] = DECAY * counts[0] + accepted, DECAY * counts[1] + rejected
        self._all[0], self._all[1] = GLOBAL_DECAY * self._all[0] + accepted, GLOBAL_DECAY * self._all[1] + rejected

    def drafter_rate(self) -> float:
        """The drafter's acceptance so far over all sequences (the prior before any)."""
        kept, rejected = self._all
        return (kept + PRIOR_WEIGHT * self.prior) / (kept + rejected + PRIOR_WEIGHT)

    def rate(self, seq: Sequence) -> float:
        """This sequence's acceptance rate, starting from the drafter's."""
        kept, rejected = self._counts.get(seq, (0.0, 0.0))
        return (kept + PRIOR_WEIGHT * self.drafter_rate()) / (kept + rejected + PRIOR_WEIGHT)

    def forget(self, seq: Sequence) -> None:
        self._counts.pop(seq, None)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verification of k drafts yields on average (accepted drafts + the target's token)."""
    return float(k + 1) if rate >= 1.0 else (1.0 - rate ** (k + 1)) / (1.0 - rate)


class SpecPolicy:
    """Which sequences speculate, and k per step (k_max for all when not adaptive)."""

    def __init__(self, k_max: int, adaptive: bool = True, prior_acceptance: float = PRIOR_ACCEPTANCE):
        self.k_max = k_max
        self.adaptive = adaptive
        self.target = StepCost()
        self.draft = StepCost()
        self.acceptance = Acceptance(prior_acceptance)
        self._steps_off = 0

    def admit(self, seq: Sequence, num_decoding: int, lag: int) -> bool:
        """At a sequence's first decode: will it speculate? Yes when, at the current batch size,
        speculation is predicted to pay and the time it saves over the sequence's remaining tokens
        repays catching the draft up on its `lag` tokens (a draft model's prefill of the prompt).
        A sequence that is not admitted never drafts, so it never costs a catch-up."""
        if not self.adaptive or lag <= 1:
            return True  # nothing to catch up (n-gram lookup): the per-step k alone decides
        throughput = self._throughput([seq] * num_decoding)
        best_k = self._best(throughput)
        if best_k == 0:
            return False
        catch_up = self.draft.predict(lag) - self.draft.predict(1)
        remaining = max(0, seq.params.max_tokens - len(seq.output_ids))
        saved = remaining * num_decoding * (1.0 / throughput[0] - 1.0 / throughput[best_k])
        return saved > 2.0 * catch_up * num_decoding  # a margin: the remaining count is an upper bound

    def choose_k(self, speculating: list[Sequence]) -> int:
        """k for this step's admitted decodes (their drafts are current within a few tokens)."""
        if not speculating:
            return 0
        if not self.adaptive:
            return self.k_max
        best_k = self._best(self._throughput(speculating))
        self._steps_off = self._steps_off + 1 if best_k == 0 else 0
        if self._steps_off >= PROBE_EVERY:
            self._steps_off = 0
            return 1
        return best_k

    def _throughput(self, seqs: list[Sequence]) -> list[float]:
        """Predicted tokens per second for k = 0..k_max (steady state)."""
        rates = [self.acceptance.rate(seq) for seq in seqs]
        out = []
        for k in range(self.k_max + 1):
            seconds = self.target.predict(len(seqs) * (k + 1)) + k * self.draft.predict(len(seqs))
            tokens = sum(expected_tokens(rate, k) for rate in rates)
            out.append(tokens / seconds if seconds > 0 else float(k))  # nothing measured: try it
        return out

    @staticmethod
    def _best(throughput: list[float]) -> int:
        best_k = max(range(len(throughput)), key=throughput.__getitem__)
        return best_k if throughput[best_k] >= MIN_GAIN * throughput[0] else 0
