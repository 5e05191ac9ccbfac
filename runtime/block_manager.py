"""PagedAttention memory: fixed-size KV blocks from one pool, per-sequence block tables.

Reference counts let sequences share blocks: full blocks are found again by a chained hash of
their tokens (prefix caching), forked samples share their parent's blocks and copy a shared
block before writing into it (copy-on-write). A block whose count drops to zero keeps its hash
and stays findable until it is evicted, least recently freed first. Shortages return
False/None, never raise.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from llmc.runtime.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens."""
    return (num_tokens + block_size - 1) // block_size


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Hash of a full block given the hash of the block before it: equal only for equal prefixes."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache, and how many were found."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried tokens served from cached blocks."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Allocates, shares, caches and frees KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id, for full computed blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.stats = PrefixCacheStats()

    # -- pool state ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks owned by no sequence (some may still hold cached prefixes)."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks owned by sequences."""
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        if self.block_hash[block] is not None:  # evict the cached prefix it held
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        assert self.ref_counts[block] == 0, "a free block was still referenced"
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, "block reference count went negative"
        if self.ref_counts[block] == 0:
            self._free[block] = None  # most recently freed: evicted last

    # -- prefix caching ------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(chain_hash(parent, seq.tokens(i * self.block_size, (i + 1) * self.block_size)))
        return seq.block_hashes  # its first num_full_blocks are those blocks' hashes

    def claim_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: share the cached blocks of its longest cached prefix.

        At least one token is always left to compute (the step must produce logits). Returns the
        number of tokens now covered (the scheduler sets seq.num_computed_tokens to it).
        """
        assert not seq.block_table, "claim_cached_prefix is for sequences without blocks"
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for h in self._hashes(seq, max_blocks)[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        return len(seq.block_table) * self.block_size

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_cached_blocks:  # no block filled up since the last call (most decode steps)
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):  # only the new ones: a long context costs no more
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_cached_blocks = num_full

    # -- allocation ----------------------------------------------------------------------------
    def _needs_copy(self, seq: Sequence) -> bool:
        """Whether the next write lands in a partly filled block that another sequence shares."""
        offset = seq.num_computed_tokens % self.block_size
        index = seq.num_computed_tokens // self.block_size
        return offset != 0 and index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def _blocks_to_add(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, blocks_needed(num_tokens, self.block_size) - len(seq.block_table)) + int(self._needs_copy(seq))

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]] | None:
        """Grow seq's table to hold num_tokens tokens.

        Returns the (src, dst) block copies the pool must perform before the step (copy-on-write
        of a shared, partly filled block), or None (and no change) when the pool is short.
        """
        if self._blocks_to_add(seq, num_tokens) > len(self._free):
            return None
        copies = []
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            src = seq.block_table[index]
            dst = self._take_free_block()
            self._release(src)
            seq.block_table[index] = dst
            copies.append((src, dst))
        while len(seq.block_table) < blocks_needed(num_tokens, self.block_size):
            seq.block_table.append(self._take_free_block())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent (n > 1 samples of one prompt)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens, child.num_cached_blocks = parent.num_computed_tokens, parent.num_cached_blocks

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody holds return to the pool (cached ones stay findable)."""
        for block in reversed(seq.block_table):  # the tail is evicted before the shared head
            self._release(block)
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first num_tokens tokens (rejected draft tokens' slots)."""
        keep = blocks_needed(num_tokens, self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def waste(self, seqs: list[Sequence]) -> float:
        """Allocated-but-unfilled KV slots / allocated slots over these sequences' distinct blocks."""
        filled: dict[int, int] = {}
        for seq in seqs:
            for i, block in enumerate(seq.block_table):
                used = min(self.block_size, max(0, seq.num_computed_tokens - i * self.block_size))
                filled[block] = max(filled.get(block, 0), used)
        allocated = len(filled) * self.block_size
        return 1.0 - sum(filled.values()) / allocated if allocated else 0.0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat pool slot of the token at `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
