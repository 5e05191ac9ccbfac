"""Speculative decoding's verification: which drafted tokens the target keeps, and the token after them.

The rule of Leviathan et al. / Chen et al. keeps the output distribution exactly the target's:
draft token d_i (drawn from q_i) is accepted with probability min(1, p_i(d_i) / q_i(d_i)); on the
first rejection the replacement is drawn from norm(max(0, p_i - q_i)); when every draft is
accepted a bonus token is drawn from p_{k+1}. p and q are the distributions the sampling
parameters define (temperature, top-k, top-p). A deterministic drafter (n-gram, or a greedy
draft model) has q_i = one-hot(d_i). Greedy decoding reduces to "keep drafts while they equal
the target's argmax", which reproduces plain greedy output token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmc.runtime.sampler import filtered_probs
from llmc.runtime.sequence import SamplingParams


@dataclass(slots=True)
class Draft:
    """Up to k proposed tokens for one sequence; probs [k, vocab] is q (None: one-hot, deterministic)."""

    tokens: list[int]
    probs: np.ndarray | None = None


def verify(target_logits: np.ndarray, draft: Draft, params: SamplingParams, rng: np.random.Generator) -> list[int]:
    """The tokens to append: the accepted drafts, then one target token. target_logits [k+1, vocab]."""
    k = len(draft.tokens)
    if params.greedy:
        out = []
        for i in range(k + 1):
            best = int(np.argmax(target_logits[i]))
            out.append(best)
            if i == k or best != draft.tokens[i]:
                return out
    vocab = target_logits.shape[-1]
    out = []
    for i, token in enumerate(draft.tokens):
        p = filtered_probs(target_logits[i], params)
        q = _draft_probs(draft, i, vocab)
        if rng.random() < min(1.0, p[token] / q[token]):
            out.append(token)
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        out.append(int(rng.choice(vocab, p=residual / total)) if total > 0 else int(rng.choice(vocab, p=p)))
        return out
    out.append(int(rng.choice(vocab, p=filtered_probs(target_logits[k], params))))
    return out


def _draft_probs(draft: Draft, i: int, vocab: int) -> np.ndarray:
    """q_i over the target's vocabulary (a draft with fewer rows never proposes the missing ids)."""
    if draft.probs is None:
        q = np.zeros(vocab)
        q[draft.tokens[i]] = 1.0
        return q
    q = draft.probs[i][:vocab]
    return np.pad(q, (0, vocab - q.shape[0])) if q.shape[0] < vocab else q


@dataclass(slots=True)
class SpecStats:
    """Cumulative speculation counters (reported by `llmc bench` and /metrics)."""

    proposed: int = 0  # draft tokens scored by the target
    accepted: int = 0  # of those, kept
    verifications: int = 0  # sequence-steps that verified at least one draft token
    draft_s: float = 0.0  # time spent drafting
    verify_s: float = 0.0  # time of target steps that verified drafts
    steps_with_speculation: int = 0
    steps_without: int = 0  # steps where the policy chose k = 0 for running decodes
    k_total: int = 0  # sum of the k chosen over those steps
    last_k: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per verification (each verification also yields one target token)."""
        return self.accepted / self.verifications if self.verifications else 0.0

    def to_dict(self) -> dict:
        """Plain numbers for JSON reports."""
        return {"proposed": self.proposed, "accepted": self.accepted, "verifications": self.verifications,
                "acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted": round(self.mean_accepted, 3),
                "draft_s": round(self.draft_s, 3), "verify_s": round(self.verify_s, 3),
                "steps_with_speculation": self.steps_with_speculation, "steps_without": self.steps_without,
                "mean_k": round(self.k_total / max(1, self.steps_with_speculation + self.steps_without), 2),
                "last_k": self.last_k}
