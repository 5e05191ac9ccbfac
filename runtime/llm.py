"""The Python API: `LLM(bundle).generate(prompts, SamplingParams)` and `LLM.stream(...)`.

The loop is schedule -> build inputs -> engine step -> sample/postprocess, once per step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llmc.artifacts.bundle import Bundle, load_bundle
from llmc.errors import RequestError
from llmc.runtime.block_manager import BlockManager, blocks_needed
from llmc.runtime.device_picks import picks_on_device, sampling_rows
from llmc.runtime.engine_config import EngineConfig
from llmc.runtime.engine_ort import FUSED_ATTENTION
from llmc.runtime.engine_setup import load_engines
from llmc.runtime.engine_stats import EngineCalls, EngineStats, StepTiming
from llmc.runtime.inflight import InFlight, stays_in_flight
from llmc.runtime.logits_processors import changes_logits, draft_rows, process
from llmc.runtime.sampler import sample_token, token_logprob
from llmc.runtime.scheduler import ScheduledSeq, Scheduler
from llmc.runtime.sequence import RequestOutput, SamplingParams, Sequence
from llmc.runtime.speculative import Draft, verify
from llmc.runtime.step_inputs import build_step_inputs
from llmc.runtime.structured_output import GrammarCompiler, SequenceGrammar
from llmc.runtime.tokenizer import BundleTokenizer, IncrementalDetokenizer

log = logging.getLogger(__name__)

KV_CACHE_FULL = "kv_cache_full"  # finish reason: the sequence alone outgrew the whole KV pool


@dataclass(slots=True)
class _SeqState:
    detok: IncrementalDetokenizer
    rng: np.random.Generator
    streamed_chars: int = 0
    reported_tokens: int = 0
    reported_prompt: bool = False  # whether a delta carried the prompt's logprobs
    grammar: SequenceGrammar | None = None  # structured output


class LLM:
    """A bundle loaded for generation: engine, KV pool, block manager, scheduler, tokenizer."""

    def __init__(self, bundle: str | Path | Bundle, config: EngineConfig | None = None, *, verify: bool = True,
                 profile_dir: str | Path | None = None, **fields):
        """config (or EngineConfig's defaults) with `fields` (EngineConfig's field names) replaced, as
        `LLM(bundle, max_num_seqs=8)`. verify=False skips the bundle's checksums; profile_dir turns on
        onnxruntime's profiler for the target engine (runtime/step_profile.py)."""
        config = replace(config or EngineConfig(), **fields)
        self.config = config
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        self.geometry = self.bundle.geometry
        self.tokenizer = BundleTokenizer(self.bundle)
        self.grammars = GrammarCompiler(self.bundle.tokenizer_dir / "tokenizer.json", self.geometry.vocab_size,
                                        self.tokenizer.eos_token_ids)
        self.engine, self.pool, self.draft_pool, self.speculation = load_engines(self.bundle, config, profile_dir)
        self.block_manager = BlockManager(self.pool.num_blocks, self.pool.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.policy)
        self.timing = StepTiming()
        self._ids = itertools.count()
        self._state: dict[Sequence, _SeqState] = {}
        self._inflight = InFlight()
        self._decoded = False  # whether the last step only decoded
        self._async = config.async_scheduling and hasattr(self.engine, "launch_sample") and self.speculation is None

    # -- requests ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the running and waiting sequences, the KV pool, and the cumulative counters."""
        bm, scheduler, engine = self.block_manager, self.scheduler, self.engine
        calls = {path: EngineCalls(*engine.path_counts[path], engine.path_seconds[path]) for path in engine.path_counts}
        return EngineStats(len(scheduler.running), len(scheduler.waiting), bm.usage(), bm.waste(scheduler.running),
                           scheduler.num_preemptions, replace(bm.stats), replace(self.timing), calls,
                           replace(self.speculation.stats) if self.speculation is not None else None)

    def validate_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt that can run here; RequestError saying why otherwise."""
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
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Validate and queue one request; it joins the batch at the next step."""
        params = params or SamplingParams()
        ids = self.validate_prompt(prompt)
        grammar = (SequenceGrammar(self.grammars.matcher(params.structured), self.geometry.vocab_size)
                   if params.structured is not None else None)
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params, arrival=next(self._ids))
        self._track(seq, grammar)
        self.scheduler.add(seq)
        return seq

    def _track(self, seq: Sequence, grammar: SequenceGrammar | None = None) -> None:
        seed = seq.params.seed
        rng = np.random.default_rng(None if seed is None else [seed % 2**64, seq.index])  # any int64 seed
        self._state[seq] = _SeqState(IncrementalDetokenizer(self.tokenizer), rng, grammar=grammar)

    def abort(self, seq: Sequence) -> None:
        """Stop a request (all its samples) now and free its blocks."""
        for s in [seq, *seq.children]:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")

    def release(self, seq: Sequence) -> None:
        """Forget a finished request's bookkeeping (its samples included)."""
        self.abort(seq)
        for s in [seq, *seq.children]:
            self._state.pop(s, None)
            if self.speculation is not None:
                self.speculation.forget(s)

    # -- the loop -----------------------------------------------------------------------------
    def step(self, before_engine: Callable[[], None] | None = None) -> list[Sequence]:
        """Run one scheduler iteration; returns the sequences that produced a token.

        before_engine runs once, just before the step's first target-engine call (onnxruntime releases the GIL
        for the call): the server hands the previous step's tokens to its event loop there, so the loop
        formats and sends them while the engine runs instead of while the step loop waits for the GIL.
        With async scheduling (runtime/inflight.py) the tokens a step returns are the previous step's, read once
        this one is queued.
        """
        start = time.perf_counter()
        draft_budget = self.speculation.draft_budget(self.scheduler.running) if self.speculation is not None else None
        work = self.scheduler.schedule(draft_budget, self._inflight.hold(self.geometry.max_position))
        for seq in work.out_of_memory:  # alone, it still outgrows the whole pool: end it with the reason
            log.warning("request %s ended: %d tokens do not fit in the KV cache (%d tokens); raise the KV "
                        "cache memory", seq.request_id, seq.num_tokens, self.pool.num_blocks * self.pool.block_size)
            self.scheduler.finish(seq, KV_CACHE_FULL)
        if not work.scheduled:
            in_flight = bool(self._inflight.calls)
            updated = list(work.out_of_memory) + self._read_in_flight()
            if in_flight:  # the wait for the last step's tokens is that step's time
                self._time_step(time.perf_counter() - start, self._decoded, count=False)
            return updated
        self.pool.copy_blocks(work.block_copies)
        if self.draft_pool is not None:
            self.draft_pool.copy_blocks(work.block_copies)
        drafts = self._draft(work.scheduled)
        previous = self._inflight.picks()  # [P] on the device: what the placeholders in this step's inputs stand for
        ran, launched = [], []  # (group, rows of each item, logits, picks)
        for group in self._engine_calls(work.scheduled):
            inputs = build_step_inputs(group, self.pool.block_size)
            rows = [item.num_logits for item in group]
            if before_engine is not None:
                before_engine()
                before_engine = None
            engine_start = time.perf_counter()
            if self._picks_on_device(group):
                picks = self.engine.launch_sample(inputs, self.pool, sampling_rows(
                    group, lambda seq: self._state[seq].rng), previous)
                if self._async and stays_in_flight(group):
                    launched.append((group, rows, picks))
                else:
                    ran.append((group, rows, None, picks))
            else:
                logits = (self.engine.step(inputs, self.pool) if previous is None
                          else self.engine.step(inputs, self.pool, previous))  # [N, vocab]
                ran.append((group, rows, logits, None))
            seconds = time.perf_counter() - engine_start
            self.timing.engine_s += seconds
            if self.speculation is not None:
                self.speculation.record_target(len(inputs.input_ids), seconds,
                                               any(item.spec_tokens for item in group))
        updated = list(work.out_of_memory) + self._read_in_flight()
        for group, rows, logits, picks in ran:
            tokens = picks.tokens() if picks is not None else None  # [N], or logits [N, vocab]
            self.timing.engine_s += picks.wait_s if picks is not None else 0.0
            row = 0
            for item, num_rows in zip(group, rows):
                if not item.seq.is_finished:  # else ended by the token read from the call in flight
                    updated.extend(self._finish_chunk_isolated(
                        item, logits[row:row + num_rows] if tokens is None else None, drafts.get(item.seq),
                        None if tokens is None or not num_rows else int(tokens[row + num_rows - 1])))
                row += num_rows
        for group, rows, picks in launched:
            for item in group:
                if not item.seq.is_finished:
                    self.scheduler.update_from_output(item)
            self._inflight.add(group, rows, picks)
        self._decoded = all(item.num_new_tokens == 1 for item in work.scheduled)
        self._time_step(time.perf_counter() - start, self._decoded)
        return list(dict.fromkeys(updated))  # a sequence may take the in-flight token and this step's

    def _time_step(self, seconds: float, decoded: bool, count: bool = True) -> None:
        """Add a step's wall time (count=False: more of the last step's) to the totals, and to the decode steps'."""
        self.timing.steps += count
        self.timing.total_s += seconds
        if decoded:
            self.timing.decode_steps += count
            self.timing.decode_s += seconds

    def _read_in_flight(self) -> list[Sequence]:
        """Append the tokens of the calls in flight (waiting for them), with the stop checks; the sequences."""
        tokens, waited = self._inflight.take()
        self.timing.engine_s += waited
        updated = []
        for seq, token in tokens:
            updated.extend(self._isolated(seq, self._append_tokens, seq, None, token))
        return updated

    def _picks_on_device(self, group: list[ScheduledSeq]) -> bool:
        """runtime/device_picks.picks_on_device for this LLM's engine."""
        return picks_on_device(self.engine, group)

    def _draft(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, Draft]:
        """Draft tokens for the decodes that have slots; attaches them to their ScheduledSeq."""
        if self.speculation is None:
            return {}
        return self.speculation.propose(scheduled, lambda seq: self._state[seq].rng)

    def _finish_chunk_isolated(self, item: ScheduledSeq, logits: np.ndarray | None, draft: Draft | None,
                               token: int | None = None) -> list[Sequence]:
        """_finish_chunk, but a failure (sampling, detokenizing, stop checks) ends this sequence alone."""
        return self._isolated(item.seq, self._finish_chunk, item, logits, draft, token)

    def _isolated(self, seq: Sequence, call: Callable[..., list[Sequence]], *args) -> list[Sequence]:
        """call(*args), the sequences it updated; a failure ends seq (and its samples) alone."""
        try:
            return call(*args)
        except Exception:
            log.exception("request %s failed after its step; ending it alone (finish reason 'error')",
                          seq.request_id)
            for s in [seq, *seq.children]:
                if not s.is_finished:
                    self.scheduler.finish(s, "error")
            return [seq, *seq.children]

    def _finish_chunk(self, item: ScheduledSeq, logits: np.ndarray | None, draft: Draft | None,
                      token: int | None = None) -> list[Sequence]:
        """After the engine ran a chunk: advance its sequence, sample (or verify drafts), append tokens. token:
        the token the engine picked on its device (then logits is None)."""
        seq = item.seq
        if not item.spec_slots:  # a prefill chunk, or a decode without draft slots
            if seq.wants_prompt_logprobs:
                self._record_prompt_logprobs(seq, item.start, logits)
            self.scheduler.update_from_output(item)
            if not item.completes:
                return []
            if seq.params.max_tokens == 0:  # the prompt was scored: nothing to generate
                self.scheduler.finish(seq, "length")
                return [seq]
            return self._append_tokens(seq, None if logits is None else logits[-1], token)
        proposed, params = item.spec_tokens, seq.params
        rows = logits
        if changes_logits(params):
            start = time.perf_counter()
            rows = draft_rows(logits, proposed, params, seq.prompt_ids, seq.output_ids, self._stop_ids(params),
                              self._state[seq].grammar)
            self.timing.constraint_s += time.perf_counter() - start
        emitted = verify(rows, Draft(proposed, draft.probs[:len(proposed)] if draft and draft.probs is not None
                                     else None), params, self._state[seq].rng)
        accepted = len(emitted) - 1
        self.speculation.record_verification(seq, len(proposed), accepted)
        self.scheduler.update_from_output(item, accepted)  # the last token and the accepted drafts have KV
        for token, row in zip(emitted, logits):
            self._append_token(seq, row, token)
            if seq.is_finished:
                break
        return [seq]

    def _engine_calls(self, scheduled: list) -> list[list]:
        """The step's engine calls: one, with the fused attention kernel (it attends each sequence's own
        rows, so decodes ride along a prefill chunk's matmuls); otherwise decodes (with their drafted
        tokens), then prefill chunks. The portable attention pads every sequence's queries to the
        longest chunk of the call: a decode batched with a 500-token chunk would cost as much as 500
        tokens of attention."""
        if self.engine.attention == FUSED_ATTENTION:
            return [scheduled]
        decodes = [item for item in scheduled if item.num_new_tokens - len(item.spec_tokens) == 1]
        chunks = [item for item in scheduled if item.num_new_tokens - len(item.spec_tokens) > 1]
        return [group for group in (decodes, chunks) if group]

    def _append_tokens(self, seq: Sequence, logits: np.ndarray | None, token: int | None = None) -> list[Sequence]:
        """Sample seq's next token (or append token, picked on the device); on a prompt's first token with n > 1,
        fork the other samples."""
        targets = [seq]
        if seq.forks_next:
            for index in range(1, seq.params.n):
                child = Sequence(seq.request_id, seq.prompt_ids, seq.params, arrival=seq.arrival, index=index)
                child.prompt_logprobs = seq.prompt_logprobs
                self.block_manager.fork(seq, child)
                grammar = self._state[seq].grammar
                self._track(child, grammar.fork() if grammar is not None else None)
                self.scheduler.add_running(child)
                seq.children.append(child)
                targets.append(child)
        for target in targets:
            self._append_token(target, logits, token)
        return targets

    def _append_token(self, seq: Sequence, logits: np.ndarray | None, token: int | None = None) -> None:
        """Append one token (sampled from logits unless given) and apply the stop conditions."""
        params = seq.params
        state = self._state[seq]
        constrained = changes_logits(params)
        start = time.perf_counter() if constrained else 0.0
        if token is None:
            allowed = state.grammar.allowed() if state.grammar is not None else None
            sampled_from = (process(logits, params, seq.prompt_ids, seq.output_ids, self._stop_ids(params), allowed)
                            if constrained else logits)
            token = sample_token(sampled_from, params, state.rng)
        if params.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, params.logprobs))
        seq.output_ids.append(token)
        if state.grammar is not None:
            state.grammar.accept(token)
        if constrained:  # sampling itself included: it is what an unconstrained token costs too, and small
            self.timing.constraint_s += time.perf_counter() - start
            self.timing.constrained_tokens += 1
        if token in params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not params.ignore_eos):
            self.scheduler.finish(seq, "stop")
            return
        seq.text += state.detok.step(token)
        for stop in params.stop:
            cut = seq.text.find(stop)
            if cut >= 0:
                seq.text = seq.text[:cut]
                self.scheduler.finish(seq, "stop")
                return
        if state.grammar is not None and state.grammar.done:  # the structured output is complete
            self.scheduler.finish(seq, "stop")
        elif seq.ends_by_length(self.geometry.max_position):
            self.scheduler.finish(seq, "length")

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        """The tokens that end a sequence (min_tokens bans them)."""
        return list(params.stop_token_ids) + ([] if params.ignore_eos else self.tokenizer.eos_token_ids)

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: np.ndarray) -> None:
        """The logprobs of the prompt tokens this chunk's rows predict (row i, at position start + i, predicts
        the token after it), in order: a recomputed chunk (after a preemption) adds none twice."""
        k = seq.params.prompt_logprobs
        for position, row in enumerate(logits, start):
            if position == len(seq.prompt_logprobs) and position + 1 < len(seq.prompt_ids):
                seq.prompt_logprobs.append(token_logprob(row, seq.prompt_ids[position + 1], k))

    # -- results ------------------------------------------------------------------------------
    def take_delta(self, seq: Sequence) -> RequestOutput:
        """Text and token ids produced since the last call, holding back a tail that may become a stop string."""
        state = self._state[seq]
        end = len(seq.text)
        if not seq.is_finished:
            for stop in seq.params.stop:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if seq.text.endswith(stop[:n]):
                        end = min(end, len(seq.text) - n)
                        break
        text = seq.text[state.streamed_chars:max(state.streamed_chars, end)]
        tokens = seq.output_ids[state.reported_tokens:]
        logprobs = seq.logprobs[state.reported_tokens:] if seq.params.logprobs is not None else None
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and not state.reported_prompt and not seq.wants_prompt_logprobs:
            prompt_logprobs, state.reported_prompt = list(seq.prompt_logprobs), True
        state.streamed_chars = max(state.streamed_chars, end)
        state.reported_tokens = len(seq.output_ids)
        return RequestOutput(seq.request_id, text, tokens, seq.is_finished, seq.finish_reason, logprobs=logprobs,
                             index=seq.index, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def output(seq: Sequence) -> RequestOutput:
        """The whole result of one sample so far."""
        params = seq.params
        return RequestOutput(seq.request_id, seq.text, list(seq.output_ids), seq.is_finished, seq.finish_reason,
                             list(seq.prompt_ids), list(seq.logprobs) if params.logprobs is not None else None,
                             index=seq.index,
                             prompt_logprobs=list(seq.prompt_logprobs) if params.prompt_logprobs is not None else None)

    # -- user API -----------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for all prompts together (continuous batching).

        Returns one output per prompt and sample, in prompt order (samples by index).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise RequestError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        seqs: list[Sequence] = []
        try:
            for prompt, sp in zip(prompts, per_prompt):
                seqs.append(self.add_request(prompt, sp))
            while any(not s.is_finished for p in seqs for s in (p, *p.children)):
                self.step()
            return [self.output(s) for p in seqs for s in (p, *p.children)]
        finally:
            for seq in seqs:  # a refused prompt (or Ctrl-C) leaves nothing queued behind
                self.release(seq)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield text deltas of one request (first sample) as they are produced."""
        seq = self.add_request(prompt, params)
        try:
            while not seq.is_finished:
                self.step()
                delta = self.take_delta(seq)
                if delta.token_ids or delta.finished:
                    yield delta
        finally:
            self.release(seq)
