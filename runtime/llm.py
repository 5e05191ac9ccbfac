"""The Python API: `LLM(bundle).generate(prompts, SamplingParams)` and `LLM.stream(...)`.

The loop is schedule -> build inputs -> engine step -> sample/postprocess, once per step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmc.artifacts.bundle import Bundle, load_bundle
from llmc.errors import RequestError
from llmc.runtime.block_manager import BlockManager, blocks_needed
from llmc.runtime.engine_ort import OrtEngine
from llmc.runtime.kv_pool import KVPool, parse_bytes
from llmc.runtime.sampler import sample_token, top_logprobs
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.sequence import RequestOutput, SamplingParams, Sequence
from llmc.runtime.step_inputs import build_step_inputs
from llmc.runtime.tokenizer import BundleTokenizer, IncrementalDetokenizer

log = logging.getLogger(__name__)


class LLM:
    """A bundle loaded for generation: engine, KV pool, block manager, scheduler, tokenizer."""

    def __init__(self, bundle: str | Path | Bundle, kv_cache_memory: str | int = "1GiB", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, num_threads: int | None = None, verify: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        self.geometry = self.bundle.geometry
        self.tokenizer = BundleTokenizer(self.bundle)
        self.engine = OrtEngine(self.bundle, num_threads)
        self.pool = KVPool.from_budget(self.geometry, self.bundle.block_size, parse_bytes(kv_cache_memory))
        self.block_manager = BlockManager(self.pool.num_blocks, self.pool.block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self._ids = itertools.count()
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._rngs: dict[str, np.random.Generator] = {}
        self._streamed: dict[str, int] = {}

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Validate and queue one request; it joins the batch at the next step."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        context = self.geometry.max_position
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the model's context is {context} "
                               "(prompt + at least one new token must fit); shorten the prompt")
        if blocks_needed(len(ids) + 1, self.pool.block_size) > self.pool.num_blocks:
            raise RequestError(f"the prompt has {len(ids)} tokens but the KV cache holds only "
                               f"{self.pool.num_blocks * self.pool.block_size}; raise --kv-cache-memory")
        if any(not 0 <= t < self.geometry.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.geometry.vocab_size})")
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params, arrival=next(self._ids))
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
        self._rngs[seq.request_id] = np.random.default_rng(params.seed)
        self._streamed[seq.request_id] = 0
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now and free its blocks."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one scheduler iteration; returns the sequences that produced a token."""
        plan = self.scheduler.schedule()
        for seq in plan.out_of_memory:
            self.scheduler.finish(seq, "length")
        if not plan.scheduled:
            return []
        inputs = build_step_inputs(plan.scheduled, self.pool.block_size)
        logits = self.engine.step(inputs, self.pool)  # [N, vocab]
        updated, row = [], 0
        for item in plan.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.completes:
                self._append_token(item.seq, logits[row])
                row += 1
                updated.append(item.seq)
        return updated

    def _append_token(self, seq: Sequence, logits: np.ndarray) -> None:
        params = seq.params
        token = sample_token(logits, params, self._rngs[seq.request_id])
        if params.logprobs is not None:
            seq.logprobs.append(top_logprobs(logits, max(params.logprobs, 1)))
        seq.output_ids.append(token)
        if token in params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not params.ignore_eos):
            self.scheduler.finish(seq, "stop")
            return
        seq.text += self._detok[seq.request_id].step(seq.output_ids)
        for stop in params.stop:
            cut = seq.text.find(stop)
            if cut >= 0:
                seq.text = seq.text[:cut]
                self.scheduler.finish(seq, "stop")
                return
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.geometry.max_position:
            self.scheduler.finish(seq, "length")

    def _delta(self, seq: Sequence) -> str:
        """Text not yet streamed, holding back a tail that may still become a stop string."""
        end = len(seq.text)
        if not seq.is_finished:
            for stop in seq.params.stop:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if seq.text.endswith(stop[:n]):
                        end = min(end, len(seq.text) - n)
                        break
        start = self._streamed[seq.request_id]
        self._streamed[seq.request_id] = max(start, end)
        return seq.text[start:end]

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.text, list(seq.output_ids), seq.is_finished, seq.finish_reason,
                             list(seq.prompt_ids), list(seq.logprobs) if seq.params.logprobs is not None else None)

    def _release(self, seq: Sequence) -> None:
        for table in (self._detok, self._rngs, self._streamed):
            table.pop(seq.request_id, None)

    # -- user API -----------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for all prompts together (continuous batching); outputs in prompt order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise RequestError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        seqs: list[Sequence] = []
        try:
            for prompt, sp in zip(prompts, per_prompt):
                seqs.append(self.add_request(prompt, sp))
            while any(not s.is_finished for s in seqs):
                self.step()
        except BaseException:
            for seq in seqs:  # a refused prompt (or Ctrl-C) leaves nothing queued behind
                self.abort(seq)
                self._release(seq)
            raise
        outputs = [self._output(s) for s in seqs]
        for seq in seqs:
            self._release(seq)
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield text deltas of one request as they are produced (other requests keep batching)."""
        seq = self.add_request(prompt, params)
        try:
            while not seq.is_finished:
                if seq in self.step() or seq.is_finished:
                    delta = self._delta(seq)
                    if delta or seq.is_finished:
                        yield RequestOutput(seq.request_id, delta, list(seq.output_ids), seq.is_finished,
                                            seq.finish_reason)
        finally:
            self.abort(seq)
            self._release(seq)
