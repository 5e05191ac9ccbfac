"""`llmc eval --chunk-tokens`: windows scored a few tokens a step read the earlier tokens' K/V from the
pool, and (fp32 pools) score as the whole window in one step does."""

import pytest

from llmc.eval_bundle import eval_bundle


def test_chunked_scoring_matches_one_step_scoring(tiny_bundle, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and runs far away from the farm. " * 40)
    whole = eval_bundle(tiny_bundle, [text], None, 64, 4)
    chunked = eval_bundle(tiny_bundle, [text], None, 64, 4, chunk_tokens=7)  # chunks end inside blocks of 4
    assert chunked["windows"] == whole["windows"] == 4 and chunked["chunk_tokens"] == 7
    assert chunked["predicted_tokens"] == whole["predicted_tokens"]
    assert chunked["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
