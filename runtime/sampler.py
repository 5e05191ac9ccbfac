"""Token selection from logits: greedy, temperature, top-k, top-p; seeded per request.

A sampled token is numpy's `rng.choice(vocab, p=probs)`: one uniform from the request's generator, searched in
the cumulative sum of the filtered probabilities in token-id order. The filters find their tokens among a few
candidates instead of sorting the vocabulary, and the search runs over the tokens they keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmc.runtime.sequence import GREEDY_TEMPERATURE, SamplingParams, TokenLogprob

_BANDS = 64  # candidate bands: band b holds the probabilities whose binary exponent is b below the largest's
_FIRST_CUT = 2.0 ** -4  # the first candidates: tokens at least this fraction of the largest probability
_DRAW_BLOCK = 256  # tokens a block in draw's two-level search
_MASS_MARGIN = 1e-9  # top-p's candidates hold this much more than top_p of the mass (summation order's rounding)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) [vocab], float64."""
    probs = logits.astype(np.float64)  # one new array, updated in place
    probs /= max(temperature, GREEDY_TEMPERATURE)
    probs -= probs.max()
    np.exp(probs, out=probs)
    probs /= probs.sum()
    return probs


def _candidates(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Token ids (ascending) holding every token the filters can keep: the most likely bands of probability (each a
    factor 2) that hold top_k tokens (top-p then cuts inside top-k's set) or, without top-k, top_p of the mass.
    Tokens in lower bands rank after all of them, so top-k's k-th largest is among the candidates and top-p's
    nucleus ends inside them. A model's distribution is mostly peaked: the tokens within _FIRST_CUT of the
    largest are tried first."""
    ids = np.flatnonzero(probs >= probs.max() * _FIRST_CUT)
    if len(ids) >= top_k if top_k else probs[ids].sum() >= top_p + _MASS_MARGIN:  # probs sum to 1
        return ids
    band = probs.view(np.int64) >> 52  # [vocab] float64's biased exponent (probs >= 0: no sign bit)
    np.subtract(band.max(), band, out=band)  # in place, as below: fresh pages cost more than the arithmetic
    np.minimum(band, _BANDS - 1, out=band)
    if top_k:
        enough = np.cumsum(np.bincount(band, minlength=_BANDS)) >= top_k
    else:
        mass = np.cumsum(np.bincount(band, weights=probs, minlength=_BANDS))
        enough = mass >= (top_p + _MASS_MARGIN) * mass[-1]
    last = int(np.argmax(enough)) if enough.any() else _BANDS - 1
    return np.flatnonzero(band <= last)


def nucleus(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens sampling can pick and their probabilities (summing to 1): temperature, then top-k (ties with the
    k-th largest kept), then top-p (the most likely tokens until the mass before one reaches top_p). ids None:
    every token, probs [vocab]; otherwise ids ascending and probs [len(ids)]."""
    probs = softmax(logits, params.temperature)
    top_k = params.top_k if 0 < params.top_k < probs.shape[-1] else 0
    if not top_k and params.top_p >= 1.0:
        return None, probs
    ids = _candidates(probs, top_k, params.top_p)
    kept = probs[ids]
    if top_k:
        kept_by_k = kept >= np.partition(kept, -top_k)[-top_k]
        ids, kept = ids[kept_by_k], kept[kept_by_k]
        total = kept.sum()  # the mass top-p measures against
    else:
        total = probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-kept, kind="stable")  # most likely first, ties by id
        ranked = kept[order] / total
        in_nucleus = np.zeros(len(kept), dtype=bool)
        in_nucleus[order[np.cumsum(ranked) - ranked < params.top_p]] = True  # mass before the token < top_p
        ids, kept = ids[in_nucleus], kept[in_nucleus]
    return ids, kept / kept.sum()


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from [vocab] (nucleus's, zeros for the tokens the filters drop)."""
    ids, probs = nucleus(logits, params)
    if ids is None:
        return probs
    dense = np.zeros(logits.shape[-1])
    dense[ids] = probs
    return dense


def draw(ids: np.ndarray | None, probs: np.ndarray, uniform: float) -> int:
    """(May overwrite probs.) The token whose cumulative probability (in id order) first exceeds uniform in [0, 1):
    what `rng.choice(vocab, p=dense_probs)` returns for the same uniform. A long distribution (temperature alone:
    the whole vocabulary) is searched in two levels, blocks then tokens, instead of a cumulative sum over all of
    it (numpy's cumsum: ~3.5 ns a token, 170 us for 49k); the sums' order differs from rng.choice's only in
    rounding (a uniform within ~1e-16 of a boundary)."""
    index = _two_level(probs, uniform) if len(probs) >= 4 * _DRAW_BLOCK else None
    if index is None:
        cdf = np.cumsum(probs, out=probs)  # probs is consumed: a vocabulary-long array is not allocated again
        cdf /= cdf[-1]
        index = int(cdf.searchsorted(uniform, side="right"))
    return index if ids is None else int(ids[index])


def _two_level(probs: np.ndarray, uniform: float) -> int | None:
    """draw's search by block sums, then within the block found; None where rounding leaves the block (the flat
    search decides)."""
    full = len(probs) // _DRAW_BLOCK * _DRAW_BLOCK
    sums = probs[:full].reshape(-1, _DRAW_BLOCK).sum(axis=1)  # [blocks]
    if full < len(probs):
        sums = np.append(sums, probs[full:].sum())
    block_cdf = np.cumsum(sums)  # [blocks]
    target = uniform * block_cdf[-1]
    block = int(block_cdf.searchsorted(target, side="right"))
    if block >= len(sums):
        return None
    start = block * _DRAW_BLOCK
    inner = np.cumsum(probs[start:start + _DRAW_BLOCK])  # [<= BLOCK]
    inner += block_cdf[block - 1] if block else 0.0
    offset = int(inner.searchsorted(target, side="right"))
    return start + offset if offset < len(inner) else None


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from logits [vocab]."""
    if params.greedy:
        return int(np.argmax(logits))
    return draw(*nucleus(logits, params), rng.random())


@dataclass(slots=True)
class SamplingRows:
    """Per logits row, how an engine picks its token on its device (engine.launch_sample): temperature (below
    GREEDY_TEMPERATURE: argmax), top_k (0: none), top_p, and the uniform the request's generator drew for it."""

    temperature: np.ndarray  # float64 [N]
    top_k: np.ndarray  # int64 [N]
    top_p: np.ndarray  # float64 [N]
    uniform: np.ndarray  # float64 [N]

    @classmethod
    def greedy(cls, num_rows: int) -> SamplingRows:
        return cls(np.zeros(num_rows), np.zeros(num_rows, np.int64), np.ones(num_rows), np.zeros(num_rows))

    @property
    def samples(self) -> bool:
        """Whether any row samples (else every row is an argmax)."""
        return bool((self.temperature >= GREEDY_TEMPERATURE).any())


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """token's log-probability under logits [vocab] and the k most likely tokens', best first."""
    logp = log_softmax(logits)
    ids = np.argpartition(-logp, k)[:k] if 0 < k < logp.shape[-1] else np.arange(logp.shape[-1] if k else 0)
    ids = ids[np.lexsort((ids, -logp[ids]))]  # best first, ties by id
    return TokenLogprob(int(token), float(logp[token]), [(int(i), float(logp[i])) for i in ids])
