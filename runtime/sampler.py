"""Token selection from logits: greedy, temperature, top-k, top-p; seeded per request."""

from __future__ import annotations

import numpy as np

from llmc.runtime.sequence import GREEDY_TEMPERATURE, SamplingParams, TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from [vocab]: temperature, then top-k, then top-p (nucleus)."""
    probs = np.exp(log_softmax(logits.astype(np.float64) / max(params.temperature, GREEDY_TEMPERATURE)))
    if 0 < params.top_k < probs.shape[-1]:
        kth = np.partition(probs, -params.top_k)[-params.top_k]
        probs = np.where(probs >= kth, probs, 0.0)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order]) / probs.sum()
        keep = cumulative - probs[order] / probs.sum() < params.top_p  # mass before this token < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
    return probs / probs.sum()


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from logits [vocab]."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = filtered_probs(logits, params)
    return int(rng.choice(probs.shape[-1], p=probs))


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """token's log-probability under logits [vocab] and the k most likely tokens', best first."""
    logp = log_softmax(logits)
    ids = np.argpartition(-logp, k)[:k] if 0 < k < logp.shape[-1] else np.arange(logp.shape[-1] if k else 0)
    ids = ids[np.lexsort((ids, -logp[ids]))]  # best first, ties by id
    return TokenLogprob(int(token), float(logp[token]), [(int(i), float(logp[i])) for i in ids])
