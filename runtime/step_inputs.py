"""The engine step contract's inputs, built from a scheduler step (or a draft model's step)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from llmc.runtime.scheduler import ScheduledSeq


@dataclass(slots=True)
class StepInputs:
    """Flattened batch of T new tokens from S sequences (docs/architecture.md: the engine step contract)."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [S, M]
    context_lens: np.ndarray  # int32 [S]
    query_start: np.ndarray  # int32 [S+1]
    logits_index: np.ndarray  # int64 [N]


@dataclass(slots=True)
class Chunk:
    """Tokens of one sequence to run: token_ids at positions start.., logits for the last num_logits."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    num_logits: int


def layout_step(chunks: list[Chunk], block_size: int) -> StepInputs:
    """Lay out chunks of several sequences as one step: a few array operations over all T tokens, not a loop
    of small ones per sequence (at batch 64 that loop cost the host 0.3 ms a step)."""
    if all(len(c.token_ids) == 1 and c.num_logits == 1 for c in chunks):
        return _layout_decodes(chunks, block_size)
    lens, starts, num_logits = np.array([(len(c.token_ids), c.start, c.num_logits) for c in chunks],
                                        dtype=np.int64).reshape(-1, 3).T.copy()  # [S] each, contiguous
    query_start = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start[1:])
    ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, int(query_start[-1]))
    block_tables = _block_tables(chunks)
    owner = np.repeat(np.arange(len(chunks)), lens)  # [T]: the chunk each token belongs to
    positions = starts[owner] + np.arange(len(ids)) - query_start[owner]  # [T]
    slots = block_tables[owner, positions // block_size].astype(np.int64) * block_size + positions % block_size
    first = np.repeat(query_start[1:] - num_logits, num_logits)  # logits: each chunk's last num_logits tokens
    logits_index = first + np.arange(len(first)) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
    return StepInputs(input_ids=ids, positions=positions, slot_mapping=slots, block_tables=block_tables,
                      context_lens=(starts + lens).astype(np.int32), query_start=query_start.astype(np.int32),
                      logits_index=logits_index)


def _layout_decodes(chunks: list[Chunk], block_size: int) -> StepInputs:
    """Decodes (one token and one logits row a chunk): each field in one pass over the chunks, which costs less
    than the general layout's array operations at batch 1 and no more at batch 64."""
    starts = [c.start for c in chunks]
    slots = [c.block_table[s // block_size] * block_size + s % block_size for c, s in zip(chunks, starts)]
    return StepInputs(input_ids=np.array([c.token_ids[0] for c in chunks], dtype=np.int64),
                      positions=np.array(starts, dtype=np.int64), slot_mapping=np.array(slots, dtype=np.int64),
                      block_tables=_block_tables(chunks), context_lens=np.array(starts, dtype=np.int32) + 1,
                      query_start=np.arange(len(chunks) + 1, dtype=np.int32),
                      logits_index=np.arange(len(chunks), dtype=np.int64))


def _block_tables(chunks: list[Chunk]) -> np.ndarray:
    """int32 [S, M]: each chunk's table, padded with block 0 (masked out)."""
    return np.array(list(itertools.zip_longest(*(c.block_table for c in chunks), fillvalue=0)),
                    dtype=np.int32).T.copy()


def build_step_inputs(scheduled: list[ScheduledSeq], block_size: int) -> StepInputs:
    """A scheduler step: each chunk's tokens, then its drafted tokens; logits for chunks that reach
    their sequence's end (the last one, or the last k+1 when verifying k drafts), and for every row of a
    prompt being scored (ScheduledSeq.num_logits)."""
    chunks = []
    for item in scheduled:
        seq, end = item.seq, item.start + item.num_new_tokens - len(item.spec_tokens)
        chunks.append(Chunk(seq.tokens(item.start, end) + item.spec_tokens, item.start, seq.block_table,
                            item.num_logits))
    return layout_step(chunks, block_size)
