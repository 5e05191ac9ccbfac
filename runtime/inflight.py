"""Async scheduling (vLLM's `--async-scheduling`): the engine calls whose tokens are picked on the device stay in
flight while the host schedules, lays out and queues the next step, so the GPU does not wait for the host between
steps.

A sequence whose next token is still being picked carries a placeholder, -(j + 1) for row j of the in-flight
picks (Sequence.pending): the scheduler counts it as a token, the next step's inputs carry it, and the engine reads
the real id from the picks on the device. After the next step is queued the host reads the picks and appends the
tokens with the usual stop checks. A sequence that stopped on its token has one more row in the step already
queued; that row's pick is dropped (and its KV slot was its own). A sequence whose pending token is its last by
length sits the next step out instead (`hold`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmc.runtime.scheduler import ScheduledSeq
from llmc.runtime.sequence import Sequence

if TYPE_CHECKING:  # the CPU serving path never imports torch
    from llmc.runtime.device_staging import DevicePicks


def stays_in_flight(group: list[ScheduledSeq]) -> bool:
    """Whether a call picked on the device may stay in flight: no sequence in it needs its token read at once (a
    prompt forking its n samples, a prompt only scored)."""
    return not any(item.completes and (item.seq.params.max_tokens == 0 or item.seq.forks_next) for item in group)


class InFlight:
    """The calls in flight: per call, the sequence of each picks row (None: dropped) and the picks."""

    def __init__(self):
        self.calls: list[tuple[list[Sequence | None], DevicePicks]] = []

    def picks(self):
        """The in-flight picks [P] on the device, in placeholder order (None when nothing is in flight)."""
        if not self.calls:
            return None
        import torch  # only an engine with launch_sample puts calls here

        return torch.cat([picks.on_device for _, picks in self.calls])

    def hold(self, max_position: int) -> set[Sequence]:
        """Sequences whose pending token ends them by length (max_tokens or the context): they skip the next step."""
        return {seq for seqs, _ in self.calls for seq in seqs if seq is not None and seq.ends_by_length(max_position)}

    def add(self, group: list[ScheduledSeq], rows: list[int], picks: DevicePicks) -> None:
        """A call just queued: each live sequence's chunk counts as computed, and the ones that pick a token get
        their placeholder. rows: each item's picks rows, as the call was laid out."""
        offset = sum(len(seqs) for seqs, _ in self.calls)
        seqs: list[Sequence | None] = []
        for item, num_rows in zip(group, rows):
            if num_rows:
                seqs.append(None if item.seq.is_finished else item.seq)
                if not item.seq.is_finished:
                    item.seq.pending = -(offset + len(seqs))
        self.calls.append((seqs, picks))

    def take(self) -> tuple[list[tuple[Sequence, int]], float]:
        """Read the picks (waiting for their calls); clears every placeholder. Returns (sequence, token) for the
        sequences still running or waiting, and the seconds waited for the device."""
        calls, self.calls = self.calls, []
        tokens, waited = [], 0.0
        for seqs, picks in calls:
            ids = picks.tokens()
            waited += picks.wait_s
            for seq, token in zip(seqs, ids):
                if seq is not None:
                    seq.pending = None
                    if not seq.is_finished:  # else aborted meanwhile: the token is dropped
                        tokens.append((seq, int(token)))
        return tokens, waited
