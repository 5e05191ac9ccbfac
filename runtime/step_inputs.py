"""The engine step contract's inputs, built from a scheduler step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmc.runtime.scheduler import ScheduledSeq


@dataclass(slots=True)
class StepInputs:
    """Flattened batch of T new tokens from S sequences (see DESIGN.md, engine step contract)."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [S, M]
    context_lens: np.ndarray  # int32 [S]
    query_start: np.ndarray  # int32 [S+1]
    logits_index: np.ndarray  # int64 [N]


def build_step_inputs(scheduled: list[ScheduledSeq], block_size: int) -> StepInputs:
    """Lay out the scheduled chunks; logits only for chunks that reach their sequence's end."""
    ids, positions, slots, logits_index = [], [], [], []
    query_start = [0]
    max_blocks = max(len(s.seq.block_table) for s in scheduled)
    block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int32)  # padding: block 0, masked out
    context_lens = np.empty(len(scheduled), dtype=np.int32)
    for i, item in enumerate(scheduled):
        seq, end = item.seq, item.start + item.num_new_tokens
        table = np.asarray(seq.block_table, dtype=np.int64)
        pos = np.arange(item.start, end, dtype=np.int64)
        ids.extend(seq.token_ids[item.start:end])
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        block_tables[i, :len(table)] = table
        context_lens[i] = end
        query_start.append(query_start[-1] + item.num_new_tokens)
        if item.completes:
            logits_index.append(query_start[-1] - 1)
    return StepInputs(
        input_ids=np.asarray(ids, dtype=np.int64), positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots), block_tables=block_tables, context_lens=context_lens,
        query_start=np.asarray(query_start, dtype=np.int32), logits_index=np.asarray(logits_index, dtype=np.int64))
