"""Which engine calls pick their tokens on the engine's device (engines with `launch_sample`: the cuda engine),
and the SamplingRows they pick them with. Such a call copies N token ids to the host instead of N x vocab logits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmc.runtime.logits_processors import changes_logits
from llmc.runtime.sampler import SamplingRows
from llmc.runtime.scheduler import ScheduledSeq
from llmc.runtime.sequence import Sequence


def forks_samples(seq: Sequence) -> bool:
    """Whether seq's next token starts n > 1 samples that each draw their own (not greedy: they would agree)."""
    return seq.forks_next and not seq.params.greedy


def picks_on_device(engine, group: list[ScheduledSeq]) -> bool:
    """Whether the engine picks this call's tokens on its device: it can (launch_sample), nothing in the call reads
    logits on the host (logprobs, logits processors, a grammar, drafts to verify), and no sampled prompt forks
    its n samples (each draws its first token from the prompt's row)."""
    return hasattr(engine, "launch_sample") and not any(
        item.seq.params.logprobs is not None or item.spec_slots or item.seq.wants_prompt_logprobs
        or changes_logits(item.seq.params) or (item.completes and forks_samples(item.seq)) for item in group)


def sampling_rows(group: list[ScheduledSeq], rng_of: Callable[[Sequence], np.random.Generator]) -> SamplingRows:
    """How the device picks each logits row's token (a call picks_on_device takes has a row only for the chunks
    that complete their sequence): argmax for greedy sequences; the sequence's filters and a uniform drawn from
    its generator (rng_of), as sample_token would draw it, for sampled ones."""
    rows = SamplingRows.greedy(sum(item.num_logits for item in group))
    for row, seq in enumerate(item.seq for item in group if item.num_logits):
        params = seq.params
        if not params.greedy:
            rows.temperature[row], rows.top_k[row], rows.top_p[row] = params.temperature, params.top_k, params.top_p
            rows.uniform[row] = rng_of(seq).random()
    return rows
