"""Decode steps replayed from CUDA graphs, one per padded batch size (vLLM's and TensorRT-LLM's way to take the
host out of the decode loop: an eager step launches ten kernels a layer from Python, a replay launches them all
at once).

A graph is captured the first time its batch size is needed, on static device buffers: one int64 buffer holds a
batch's token ids, positions, slots, context lengths and block tables, so a step stages its inputs with one copy
(through the engine's DeviceStaging: it does not wait for the step before). A second buffer holds the picks of
the calls in flight (async scheduling), which input ids -(j + 1) stand for.
Rows past the batch are padding: slot -1 (no K/V is written) and context 0 (attention reads nothing, gives 0).
The launch grids are fixed by the longest context a graph serves (GRAPH_MAX_CONTEXT, or the model's own limit);
a step past it, a prefill or a verification runs eagerly. On a machine without CUDA (the tests) the same buffers
and padding run eagerly, so everything but the capture itself is checked there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from llmc.runtime.step_inputs import StepInputs

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
GRAPH_MAX_CONTEXT = 8192
FIELDS = 4  # ids, positions, slots, context lengths; then the tables


class DecodeGraphs:
    """The engine's decode steps at up to max_num_seqs sequences, as graph replays."""

    def __init__(self, engine, max_num_seqs: int):
        self.engine = engine
        self.sizes = sorted({b for b in BATCH_SIZES if b < max_num_seqs} | {max_num_seqs})
        self.max_context = min(engine.geometry.max_position, GRAPH_MAX_CONTEXT)
        self.on_cuda = engine.device == "cuda"
        self.max_previous = 2 * self.sizes[-1]  # picks in flight: forked samples may run past max_num_seqs
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self._width = 0  # block-table entries a row
        self._staged = self._host = self._previous = None
        self._memory = torch.cuda.graph_pool_handle() if self.on_cuda else None

    def serves(self, num_seqs: int, max_context: int, num_previous: int = 0) -> bool:
        """Whether a decode step of num_seqs sequences, the longest max_context tokens, with num_previous picks in
        flight replays a graph."""
        return num_seqs <= self.sizes[-1] and max_context <= self.max_context and num_previous <= self.max_previous

    def run(self, inputs: StepInputs, pool, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, vocab] on the device of a decode step (serves() said yes); previous [P]: the picks of the
        calls in flight."""
        if self._staged is None:
            self._allocate(pool.block_size)
        num_seqs = len(inputs.input_ids)
        size = next(b for b in self.sizes if b >= num_seqs)
        if size not in self._replays:
            self._replays[size] = self._capture(size, pool)
        self._stage(inputs, size)
        if previous is not None:
            self._previous[:len(previous)].copy_(previous)  # on the device, queued after the calls that pick them
        return self._replays[size]()[:num_seqs]

    def _allocate(self, block_size: int) -> None:
        self._width = -(-self.max_context // block_size)
        length = self.sizes[-1] * (FIELDS + self._width)
        self._host = np.zeros(length, dtype=np.int64)
        self._staged = torch.zeros(length, dtype=torch.int64, device=self.engine.device)
        self._previous = torch.zeros(self.max_previous, dtype=torch.int64, device=self.engine.device)

    def _fields(self, buffer, size: int) -> list:
        """A batch of `size` rows' views of a buffer: ids, positions, slots, context lengths [size] and tables
        [size, width], laid out from the buffer's start (a small batch stages a short prefix)."""
        flat = [buffer[k * size:(k + 1) * size] for k in range(FIELDS)]
        tables = buffer[FIELDS * size:(FIELDS + self._width) * size].reshape(size, self._width)
        return [*flat, tables]

    def _stage(self, inputs: StepInputs, size: int) -> None:
        """Copy a step's inputs, padded to `size` rows, into the static device buffer (one host-to-device copy)."""
        n = len(inputs.input_ids)
        ids, positions, slots, lens, tables = self._fields(self._host, size)
        ids[:n], positions[:n], slots[:n], lens[:n] = (inputs.input_ids, inputs.positions, inputs.slot_mapping,
                                                       inputs.context_lens)
        ids[n:], positions[n:], slots[n:], lens[n:] = 0, 0, -1, 0
        width = min(inputs.block_tables.shape[1], self._width)  # entries past a context are never read
        tables[:n, :width] = inputs.block_tables[:, :width]
        length = (FIELDS + self._width) * size
        self.engine.staging.copy_to(self._staged[:length], self._host[:length])

    def _capture(self, size: int, pool):
        """The replay of a decode step of `size` rows: a captured graph, or (without CUDA) the same call."""
        ids, positions, slots, lens, tables = self._fields(self._staged, size)
        starts = torch.arange(size + 1, device=ids.device)  # one query each (decode reads none of it)
        logits_index = torch.arange(size, device=ids.device)
        self._pad(size)

        def forward() -> torch.Tensor:
            return self.engine.forward(ids, positions, slots, tables, lens, starts, logits_index, pool, 1,
                                       self.max_context, self._previous)

        if not self.on_cuda:
            return forward
        log.info("capturing the decode step at batch %d as a CUDA graph", size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # compile the kernels, warm cuBLAS: not inside the capture
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory), torch.no_grad():
            logits = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    def _pad(self, size: int) -> None:
        """Stage an all-padding batch (nothing written, nothing read): what the capture's warm-up runs on."""
        empty = StepInputs(input_ids=np.zeros(0, np.int64), positions=np.zeros(0, np.int64),
                           slot_mapping=np.zeros(0, np.int64), block_tables=np.zeros((0, 1), np.int32),
                           context_lens=np.zeros(0, np.int32), query_start=np.zeros(1, np.int32),
                           logits_index=np.zeros(0, np.int64))
        self._stage(empty, size)
