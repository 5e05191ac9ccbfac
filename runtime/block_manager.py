"""Hands out fixed-size KV blocks from one pool and keeps each sequence's block table."""

from __future__ import annotations

from collections import deque

from llmc.runtime.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens."""
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Free list plus reference counts; shortages return False, never raise."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's table can grow to hold num_tokens tokens."""
        missing = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        return missing <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if the pool is short."""
        missing = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if missing > len(self._free):
            return False
        for _ in range(max(0, missing)):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, "a free block was still referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def deallocate(self, seq: Sequence) -> None:
        """Return seq's blocks to the pool."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, "block reference count went negative"
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat pool slot of the token at `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0
