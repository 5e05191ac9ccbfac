"""The engine step contract's inputs, built from a scheduler step (or a draft model's step)."""

from __future__ import annotations

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
    """Lay out chunks of several sequences as one step."""
    ids, positions, slots, logits_index = [], [], [], []
    query_start = [0]
    max_blocks = max(len(c.block_table) for c in chunks)
    block_tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)  # padding: block 0, masked out
    context_lens = np.empty(len(chunks), dtype=np.int32)
    for i, chunk in enumerate(chunks):
        end = chunk.start + len(chunk.token_ids)
        table = np.asarray(chunk.block_table, dtype=np.int64)
        pos = np.arange(chunk.start, end, dtype=np.int64)
        ids.extend(chunk.token_ids)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        block_tables[i, :len(table)] = table
        context_lens[i] = end
        query_start.append(query_start[-1] + len(chunk.token_ids))
        logits_index.extend(range(query_start[-1] - chunk.num_logits, query_start[-1]))
    return StepInputs(
        input_ids=np.asarray(ids, dtype=np.int64), positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots), block_tables=block_tables, context_lens=context_lens,
        query_start=np.asarray(query_start, dtype=np.int32), logits_index=np.asarray(logits_index, dtype=np.int64))


def build_step_inputs(scheduled: list[ScheduledSeq], block_size: int) -> StepInputs:
    """A scheduler step: each chunk's tokens, then its drafted tokens; logits for chunks that reach
    their sequence's end (the last one, or the last k+1 when verifying k drafts), and for every row of a
    prompt being scored (ScheduledSeq.num_logits)."""
    chunks = []
    for item in scheduled:
        seq, end = item.seq, item.start + item.num_new_tokens - len(item.spec_tokens)
        chunks.append(Chunk(seq.token_ids[item.start:end] + item.spec_tokens, item.start, seq.block_table,
                            item.num_logits))
    return layout_step(chunks, block_size)
