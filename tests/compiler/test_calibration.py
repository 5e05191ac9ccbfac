"""Calibration / evaluation windows: reproducible, whole chunks, clear errors when text runs short."""

import json

import numpy as np
import pytest

from llmc.compiler import calibration
from llmc.compiler.evaluate import evaluate
from llmc.errors import ConfigError


def test_windows_are_seeded_whole_chunks():
    ids = list(range(1000))
    a = calibration.windows(ids, 50, 5, seed=3, what="calibration")
    assert a.shape == (5, 50) and np.array_equal(a, calibration.windows(ids, 50, 5, seed=3, what="calibration"))
    assert all(row[0] % 50 == 0 and np.array_equal(row, np.arange(row[0], row[0] + 50)) for row in a)
    assert not np.array_equal(a, calibration.windows(ids, 50, 5, seed=4, what="calibration"))
    assert np.array_equal(calibration.windows(ids, 300, None, None, "eval")[:, 0], [0, 300, 600])


def test_too_little_text_says_how_much_is_needed():
    with pytest.raises(ConfigError, match="gives 100 tokens but 4 window.* need 256"):
        calibration.windows(list(range(100)), 64, 4, 0, "calibration")


def test_token_files(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10))
    (tmp_path / "b.json").write_text(json.dumps([1, 2, 3]))
    assert calibration.token_stream(tmp_path, [], [tmp_path / "a.npy", tmp_path / "b.json"], 100) == \
        list(range(10)) + [1, 2, 3]
    (tmp_path / "bad.json").write_text(json.dumps([1, 500]))
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 100\)"):
        calibration.token_stream(tmp_path, [], [tmp_path / "bad.json"], 100)
    (tmp_path / "nested.json").write_text(json.dumps([[1, 2]]))
    with pytest.raises(ConfigError, match="flat list"):
        calibration.token_stream(tmp_path, [], [tmp_path / "nested.json"], 100)


def test_perplexity_and_kl_against_numpy():
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 7, size=(3, 9))
    table = {i: rng.normal(size=(9, 7)) for i in range(3)}
    model = lambda ids: table[int(np.flatnonzero((windows == ids).all(1))[0])]  # noqa: E731
    uniform = lambda ids: np.zeros((len(ids), 7))  # noqa: E731
    result = evaluate(uniform, windows, reference=model)
    assert result["perplexity"] == pytest.approx(7.0) and result["predicted_tokens"] == 24
    logp = {i: table[i] - np.log(np.exp(table[i]).sum(-1, keepdims=True)) for i in range(3)}
    nll = -np.mean([logp[i][t, windows[i, t + 1]] for i in range(3) for t in range(8)])
    assert result["reference_perplexity"] == pytest.approx(np.exp(nll))
    kl = np.mean([(np.exp(logp[i]) * (logp[i] - np.log(1 / 7))).sum(-1) for i in range(3)])
    assert result["kl_from_reference"] == pytest.approx(kl)
    assert evaluate(model, windows, reference=model)["kl_from_reference"] == pytest.approx(0.0, abs=1e-12)
