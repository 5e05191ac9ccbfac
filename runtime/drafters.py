"""Drafters for speculative decoding: prompt lookup (n-gram) and a draft model with its own KV pools.

A drafter proposes up to k tokens per sequence for the step about to run; the target then
verifies them (runtime.speculative). The draft model shares the target's block manager: the
same block tables index the draft's pools, so blocks are allocated, shared, copied and freed once.
"""

from __future__ import annotations

import time

import numpy as np

from llmc.runtime.engine_ort import OrtEngine
from llmc.runtime.kv_pool import KVPool
from llmc.runtime.sampler import filtered_probs
from llmc.runtime.scheduler import ScheduledSeq
from llmc.runtime.sequence import Sequence
from llmc.runtime.speculative import Draft
from llmc.runtime.step_inputs import Chunk, layout_step

LONG_CHUNK = 8  # catch-up chunks longer than this (a prompt) run in their own engine call


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    max_n down to min_n) in its prompt and output, and propose the tokens that followed it."""

    def __init__(self, min_n: int = 1, max_n: int = 3):
        self.min_n, self.max_n = min_n, max_n
        self.step_costs: list[tuple[int, float]] = []  # (tokens, seconds) per draft step: see ModelDrafter

    def propose(self, items: list[ScheduledSeq], rngs: dict) -> dict[Sequence, Draft]:
        start = time.perf_counter()
        drafts = {}
        for item in items:
            tokens = self.lookup(item.seq.token_ids, item.spec_slots)
            if tokens:
                drafts[item.seq] = Draft(tokens)
        # one lookup round drafts up to k tokens for every sequence: as k draft steps of one token per sequence
        k = max(item.spec_slots for item in items)
        self.step_costs.append((len(items), (time.perf_counter() - start) / k))
        return drafts

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the last n tokens ([] if none)."""
        data = np.asarray(token_ids, dtype=np.int32)
        raw = data.tobytes()
        for n in range(min(self.max_n, len(data) - 1), self.min_n - 1, -1):
            pattern = raw[-4 * n:]
            end = len(raw) - 4  # a match must end before the last token, so something follows it
            while (at := raw.rfind(pattern, 0, end)) >= 0:
                if at % 4 == 0:
                    start = at // 4 + n
                    return data[start:start + k].tolist()
                end = at + len(pattern) - 1
        return []

    def lag(self, seq: Sequence) -> int:
        """Tokens to process before drafting (none: lookup needs no state)."""
        return 0

    def forget(self, seq: Sequence) -> None:
        pass


class ModelDrafter:
    """A draft model over its own pools (same block tables as the target). Keeps, per sequence, how
    many tokens of its KV are valid; after a verification that is at most the target's computed count."""

    def __init__(self, engine: OrtEngine, pool: KVPool, vocab_size: int):
        self.engine, self.pool, self.vocab_size = engine, pool, vocab_size
        self._computed: dict[Sequence, tuple[int, int]] = {}  # seq -> (valid tokens, preemptions seen)
        # (tokens, seconds) per draft engine call, for the policy's cost line (a draft step processes one token
        # per sequence; a catch-up call, a sequence's lag)
        self.step_costs: list[tuple[int, float]] = []

    def _valid(self, seq: Sequence) -> int:
        computed, preemptions = self._computed.get(seq, (0, seq.num_preemptions))
        if preemptions != seq.num_preemptions:  # its blocks were freed: start over
            return 0
        return min(computed, seq.num_computed_tokens)  # drafts past the accepted ones are stale

    def lag(self, seq: Sequence) -> int:
        """Tokens of seq the draft's KV does not cover yet (its first draft call processes them)."""
        return seq.num_tokens - self._valid(seq)

    def propose(self, items: list[ScheduledSeq], rngs: dict) -> dict[Sequence, Draft]:
        """k draft steps for all items together: the first catches each sequence's draft KV up."""
        seqs = [item.seq for item in items]
        tokens: dict[Sequence, list[int]] = {seq: [] for seq in seqs}
        probs: dict[Sequence, list[np.ndarray]] = {seq: [] for seq in seqs}
        chunks = {}
        for seq in seqs:
            start = self._valid(seq)
            chunks[seq] = Chunk(seq.tokens(start, seq.num_tokens), start, seq.block_table, 1)
        limit = {item.seq: item.spec_slots for item in items}
        while chunks:
            for seq, logits in self._run(chunks).items():
                token, q = self._sample(seq, logits, rngs[seq])
                tokens[seq].append(token)
                if q is not None:
                    probs[seq].append(q)
                self._computed[seq] = (chunks[seq].start + len(chunks[seq].token_ids), seq.num_preemptions)
            chunks = {seq: Chunk([tokens[seq][-1]], seq.num_tokens + len(tokens[seq]) - 1, seq.block_table, 1)
                      for seq in chunks if len(tokens[seq]) < limit[seq]}
        return {seq: Draft(tokens[seq], np.stack(probs[seq]) if probs[seq] else None) for seq in seqs}

    def _run(self, chunks: dict[Sequence, Chunk]) -> dict[Sequence, np.ndarray]:
        """Draft logits [vocab] per sequence; long catch-ups (prompts) in a separate call."""
        out = {}
        for group in ([s for s, c in chunks.items() if len(c.token_ids) <= LONG_CHUNK],
                      [s for s, c in chunks.items() if len(c.token_ids) > LONG_CHUNK]):
            if group:
                inputs = layout_step([chunks[s] for s in group], self.pool.block_size)
                start = time.perf_counter()
                logits = self.engine.step(inputs, self.pool)
                self.step_costs.append((len(inputs.input_ids), time.perf_counter() - start))
                out.update(zip(group, logits))
        return out

    def _sample(self, seq: Sequence, logits: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray | None]:
        """The draft token and q (None for greedy: the proposal is deterministic)."""
        logits = logits[:self.vocab_size]
        if seq.params.greedy:
            return int(np.argmax(logits)), None
        q = filtered_probs(logits, seq.params)
        return int(rng.choice(q.shape[-1], p=q)), q

    def forget(self, seq: Sequence) -> None:
        self._computed.pop(seq, None)
