"""The device sampler (runtime/device_sampler.py, torch) against the host's sampler on the same rows and
uniforms: the same tokens for every mix of greedy, temperature, top-k (with ties at the k-th) and top-p rows."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the device sampler is not tested here")

from llmc.runtime.device_sampler import sample_rows  # noqa: E402
from llmc.runtime.sampler import SamplingRows, draw, nucleus  # noqa: E402
from llmc.runtime.sequence import SamplingParams  # noqa: E402


def _rows(rng, num_rows, vocab):
    """Random per-row settings: a quarter greedy, the rest with and without top-k / top-p."""
    rows = SamplingRows.greedy(num_rows)
    for i in range(num_rows):
        if rng.random() < 0.25:
            continue
        rows.temperature[i] = rng.choice([0.3, 0.8, 1.0, 1.7])
        rows.top_k[i] = rng.choice([0, 0, 1, 3, 20, vocab, vocab + 5])
        rows.top_p[i] = rng.choice([1.0, 1.0, 0.5, 0.9, 0.99])
        rows.uniform[i] = rng.random()
    return rows


def _host(logits, rows):
    tokens = []
    for i, row in enumerate(logits):
        if rows.temperature[i] == 0:
            tokens.append(int(np.argmax(row)))
            continue
        params = SamplingParams(temperature=float(rows.temperature[i]), top_k=int(rows.top_k[i]),
                                top_p=float(rows.top_p[i]))
        tokens.append(draw(*nucleus(row, params), rows.uniform[i]))
    return tokens


@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_device_rows_pick_what_the_host_sampler_picks(vocab):
    rng = np.random.default_rng()
    for _ in range(5):
        logits = (rng.standard_normal((24, vocab)) * rng.choice([0.5, 3.0, 8.0])).astype(np.float32)
        logits[3, :4] = logits[3].max() + 1.0  # ties at the top: top-k keeps them all, argmax takes the first
        rows = _rows(rng, len(logits), vocab)
        got = sample_rows(torch.from_numpy(logits), rows)
        assert got.dtype == torch.int64
        assert got.tolist() == _host(logits, rows)


def test_all_greedy_rows_are_the_argmax():
    logits = np.random.default_rng().standard_normal((5, 50)).astype(np.float32)
    got = sample_rows(torch.from_numpy(logits), SamplingRows.greedy(5))
    assert got.tolist() == logits.argmax(-1).tolist()


def test_device_draws_follow_the_distribution():
    """Many uniforms on one row: the picked tokens' frequencies are the filtered distribution's."""
    rng = np.random.default_rng()
    logits = np.log(np.array([[0.45, 0.3, 0.15, 0.06, 0.04]]))
    n = 6000
    rows = SamplingRows(np.ones(n), np.zeros(n, np.int64), np.full(n, 0.8), rng.random(n))
    got = sample_rows(torch.from_numpy(np.repeat(logits, n, axis=0)), rows).numpy()
    freq = np.bincount(got, minlength=5) / n
    np.testing.assert_allclose(freq, [0.5, 1 / 3, 1 / 6, 0, 0], atol=0.03)  # top-p 0.8 keeps the first three
