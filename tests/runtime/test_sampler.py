"""Sampler filters against direct numpy definitions."""

import numpy as np

from llmc.runtime.sampler import draw, filtered_probs, sample_token, token_logprob
from llmc.runtime.sequence import SamplingParams


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    assert sample_token(logits, SamplingParams(), np.random.default_rng()) == int(np.argmax(logits))


def test_top_k_keeps_the_k_largest():
    logits = np.random.default_rng(1).normal(size=100)
    probs = filtered_probs(logits, SamplingParams(temperature=0.7, top_k=5))
    assert set(np.flatnonzero(probs)) == set(np.argsort(logits)[-5:])
    expected = _softmax(logits / 0.7)[np.argsort(logits)[-5:]]
    np.testing.assert_allclose(np.sort(probs[probs > 0]), np.sort(expected / expected.sum()), rtol=1e-9)


def test_top_p_smallest_set_reaching_p():
    probs_in = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    probs = filtered_probs(np.log(probs_in), SamplingParams(temperature=1.0, top_p=0.8))
    assert np.flatnonzero(probs).tolist() == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.85
    np.testing.assert_allclose(probs[:3], probs_in[:3] / 0.85)


def test_sampling_frequencies_follow_the_distribution():
    probs_in = np.array([0.6, 0.3, 0.1])
    rng = np.random.default_rng(3)
    draws = [sample_token(np.log(probs_in), SamplingParams(temperature=1.0), rng) for _ in range(6000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.abs(freq - probs_in).max() < 0.03  # ~5 standard errors at n=6000


def test_top_logprobs():
    logits = np.array([1.0, 3.0, 2.0])
    (i1, lp1), (i2, lp2) = token_logprob(logits, 0, 2).top
    assert (i1, i2) == (1, 2) and abs((lp1 - lp2) - 1.0) < 1e-12


def _reference_probs(logits, params):
    """The filters' definitions, directly over the whole sorted vocabulary."""
    probs = _softmax(logits.astype(np.float64) / params.temperature)
    if 0 < params.top_k < len(probs):
        probs = np.where(probs >= np.sort(probs)[-params.top_k], probs, 0.0)  # ties with the k-th stay
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order] / probs.sum()
        keep = np.zeros(len(probs), dtype=bool)
        keep[order[np.cumsum(ranked) - ranked < params.top_p]] = True
        probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def test_filters_and_draws_match_the_definitions_and_rng_choice():
    """Peaked to nearly flat distributions (the candidate bands must widen), ties at the top-k cut: the same
    distribution as the definitions, and the token numpy's rng.choice picks from it with the same generator."""
    rng = np.random.default_rng()
    for _ in range(60):
        vocab = int(rng.choice([5, 300, 5000, 49152]))
        logits = (rng.standard_normal(vocab) * rng.choice([0.01, 1.0, 4.0, 20.0])).astype(np.float32)
        logits[rng.integers(vocab, size=3)] = logits.max()  # tied most likely tokens
        params = SamplingParams(temperature=float(rng.choice([0.05, 0.7, 1.0, 2.0])),
                                top_k=int(rng.choice([0, 1, 2, 50, vocab])),
                                top_p=float(rng.choice([1.0, 0.3, 0.9, 0.999])))
        reference = _reference_probs(logits, params)
        np.testing.assert_allclose(filtered_probs(logits, params), reference, rtol=1e-9, atol=1e-300)
        seed = int(rng.integers(2**63))
        expected = int(np.random.default_rng(seed).choice(vocab, p=reference))
        assert sample_token(logits, params, np.random.default_rng(seed)) == expected


def test_long_draws_match_one_cumulative_sum():
    """draw's two-level search (blocks, then tokens) picks the token a single cumulative sum in id order picks
    (rng.choice's computation): long vocabularies with a partial last block, spans of zero probability (low
    temperatures underflow). At the very end of [0, 1) the sums' rounding decides: there the token has
    probability and its cumulative range holds the uniform, to rounding."""
    rng = np.random.default_rng()
    for _ in range(200):
        vocab = int(rng.choice([1024, 1100, 5000, 49152, 128256]))
        probs = np.exp((rng.standard_normal(vocab) * rng.choice([0.5, 3.0, 40.0])).astype(np.float64))
        probs[rng.integers(vocab, size=vocab // 3)] = 0.0  # holes, and whole blocks of zeros at times
        probs[: rng.integers(0, vocab // 2)] *= rng.choice([0.0, 1.0])
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        for uniform in [0.0, *rng.random(20)]:
            expected = int(cdf.searchsorted(uniform, side="right"))
            assert draw(None, probs.copy(), uniform) == expected
            assert probs[expected] > 0
        last = draw(None, probs.copy(), 1.0 - 2.0**-53)
        assert probs[last] > 0 and cdf[last] >= 1.0 - 1e-12 and (last == 0 or cdf[last - 1] <= 1.0 - 2.0**-53 + 1e-12)
