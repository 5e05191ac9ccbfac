"""The step layout (runtime/step_inputs.py) against a token-by-token reference of the engine step contract
(docs/architecture.md), on random chunks: prefills, decodes, drafts and scored prompts over holed tables."""

import numpy as np
import pytest

from llmc.runtime.sequence import SamplingParams, Sequence
from llmc.runtime.step_inputs import Chunk, layout_step


def reference_layout(chunks: list[Chunk], block_size: int) -> dict[str, list]:
    """The contract's fields, one token at a time."""
    out = {"input_ids": [], "positions": [], "slot_mapping": [], "context_lens": [], "query_start": [0],
           "logits_index": []}
    for chunk in chunks:
        for offset, token in enumerate(chunk.token_ids):
            position = chunk.start + offset
            out["input_ids"].append(token)
            out["positions"].append(position)
            out["slot_mapping"].append(chunk.block_table[position // block_size] * block_size
                                       + position % block_size)
        end = out["query_start"][-1] + len(chunk.token_ids)
        out["context_lens"].append(chunk.start + len(chunk.token_ids))
        out["query_start"].append(end)
        out["logits_index"].extend(range(end - chunk.num_logits, end))
    return out


@pytest.mark.parametrize("trial", range(30))
def test_layout_matches_the_token_by_token_contract(trial):
    """Every third trial is all decodes (one token and one logits row a chunk: the layout's shortcut)."""
    rng = np.random.default_rng()
    block_size = int(rng.choice([1, 4, 16]))
    chunks = []
    for _ in range(int(rng.integers(1, 9))):
        start, length = int(rng.integers(0, 40)), 1 if trial % 3 == 0 else int(rng.integers(1, 20))
        table = rng.permutation(64)[:-(-(start + length) // block_size) + int(rng.integers(0, 3))].tolist()
        num_logits = 1 if trial % 3 == 0 else int(rng.choice([0, 1, min(3, length), length]))
        chunks.append(Chunk(rng.integers(0, 1000, length).tolist(), start, table, num_logits))
    got, expected = layout_step(chunks, block_size), reference_layout(chunks, block_size)
    for name, values in expected.items():
        array = getattr(got, name)
        assert array.dtype == (np.int32 if name in ("context_lens", "query_start") else np.int64), name
        assert array.flags.c_contiguous, name  # engines hand the buffers to kernels as they are
        np.testing.assert_array_equal(array, values, err_msg=name)
    assert got.block_tables.dtype == np.int32 and got.block_tables.flags.c_contiguous
    for row, chunk in zip(got.block_tables, chunks):  # each table, padded with block 0
        width = len(chunk.block_table)
        assert row[:width].tolist() == chunk.block_table and not row[width:].any()


def test_sequence_token_slices_cross_the_prompt_end():
    seq = Sequence("r", [1, 2, 3, 4], SamplingParams(), output_ids=[5, 6, 7])
    for start in range(8):
        for end in range(start, 8):
            assert seq.tokens(start, end) == seq.token_ids[start:end]
