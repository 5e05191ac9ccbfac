"""Streaming detokenization (runtime/tokenizer.py IncrementalDetokenizer) against decoding the whole output: the
deltas add up to it, and none splits a multi-byte character."""

import numpy as np
import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.runtime.tokenizer import BundleTokenizer, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return BundleTokenizer(load_bundle(tiny_bundle))


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.step(token) for token in ids]


def test_deltas_add_up_to_the_whole_text_and_keep_characters_whole(tokenizer):
    text = "naïve café — 日本語 🎉, the end"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 4  # the byte-level BPE splits the multi-byte characters over tokens
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert "" in deltas  # a token that ends inside a character gives no text yet
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("trial", range(10))
def test_random_ids_stream_what_a_whole_decode_gives(tokenizer, trial):
    rng = np.random.default_rng()
    ids = rng.integers(0, 320, int(rng.integers(1, 30))).tolist()
    streamed, whole = "".join(_stream(tokenizer, ids)), tokenizer.decode(ids)
    if whole.endswith("\ufffd"):  # an unfinished character at the end is held back
        assert whole.startswith(streamed)
    else:
        assert streamed == whole, ids
