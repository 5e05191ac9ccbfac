"""Runs the LLM step loop on one thread and feeds results to asyncio request handlers.

Handlers submit (tokenized, validated) requests and read deltas from an asyncio.Queue; aborts
(client disconnects) reach the loop between steps. Only the loop thread touches the LLM's
mutable state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from llmc.runtime.llm import LLM
from llmc.runtime.metrics import ServingMetrics
from llmc.runtime.sequence import RequestOutput, SamplingParams, Sequence

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


@dataclass(slots=True)
class _InFlight:
    """A request between submit and its end: its sequence, the queue its deltas go to, its token times."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)
    seq: Sequence | None = None

    def push(self, item: RequestOutput | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the server's event loop has closed: nobody is listening any more
            pass


class AsyncEngine:
    """The bridge between HTTP handlers and the step loop."""

    def __init__(self, llm: LLM, max_waiting: int = 256, metrics: ServingMetrics | None = None):
        self.llm = llm
        self.max_waiting = max_waiting
        self.metrics = metrics or ServingMetrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _InFlight] = {}
        self._num_active = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmc-engine", daemon=True)
        # Deltas of the last step not yet handed to the event loop: delivered just before the next step's
        # engine call (LLM.step's before_engine), or before their request ends.
        self._undelivered: list[tuple[_InFlight, RequestOutput]] = []

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet finished."""
        return self._num_active

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread (after the server has drained)."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its deltas (then None) arrive on."""
        with self._lock:
            if self._num_active >= self.llm.scheduler.max_num_seqs + self.max_waiting:
                raise Overloaded(f"{self._num_active} requests in flight; the waiting queue is full")
            self._num_active += 1
        request = _InFlight(f"req-{next(self._ids)}", prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", request))
        return request.request_id, request.out

    def abort(self, request_id: str) -> None:
        """Abort a request (e.g. its client went away); its blocks are freed before the next step."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """End every request in flight with finish reason "abort" (the server's drain timeout ran out)."""
        self._inbox.put(("abort_all", None))

    # -- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.llm.scheduler.has_unfinished())
            if self.llm.scheduler.has_unfinished():
                try:
                    self._step()
                except Exception:  # keep serving: fail the requests of the broken step, not the server
                    running = {seq.request_id for seq in self.llm.scheduler.running}
                    log.exception("engine step failed; ending the %d running requests", len(running))
                    for request_id in [r for r in self._requests if r in running]:
                        self._finish(request_id, "failed", final_reason="error")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                try:
                    payload.seq = self.llm.add_request(payload.prompt_ids, payload.params, payload.request_id)
                except Exception:  # validated by the handler already; never let one request stop the loop
                    log.exception("could not queue request %s", payload.request_id)
                    payload.push(RequestOutput(payload.request_id, "", [], True, "error"))
                    payload.push(None)
                    with self._lock:
                        self._num_active -= 1
                else:
                    self._requests[payload.request_id] = payload
                    with self.metrics.lock:
                        self.metrics.counters["llmc_prompt_tokens_total"] += len(payload.prompt_ids)
            elif kind == "abort" and payload in self._requests:
                self._finish(payload, "aborted")
            elif kind == "abort_all":
                for request_id in list(self._requests):
                    self._finish(request_id, "aborted", final_reason="abort")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self) -> None:
        """Hand the undelivered deltas to the event loop (each push wakes it)."""
        undelivered, self._undelivered = self._undelivered, []
        for request, delta in undelivered:
            request.push(delta)

    def _step(self) -> None:
        """One LLM step. Its tokens are delivered at the next step's engine call, not now: waking the event
        loop hands it the GIL, and the step loop then waited for the loop's whole SSE write (~0.3 ms a token
        at batch 1, measured); during the engine call the two run side by side."""
        updated = self.llm.step(before_engine=self._deliver)
        self._deliver()  # a step without an engine call
        now = time.perf_counter()
        m = self.metrics
        failed = set()
        with m.lock:
            for seq in updated:
                request = self._requests.get(seq.request_id)
                if request is None or seq.request_id in failed:
                    continue
                try:
                    delta = self.llm.take_delta(seq)
                except Exception:
                    log.exception("could not deliver request %s's tokens; ending it alone", seq.request_id)
                    delta = RequestOutput(seq.request_id, "", [], True, "error", index=seq.index)
                if delta.finish_reason == "error":  # one failed sample fails its request, not the step
                    failed.add(seq.request_id)
                    continue
                m.counters["llmc_generation_tokens_total"] += len(delta.token_ids)
                previous = request.last_token.get(seq.index)
                if previous is None and seq.index == 0:
                    m.ttft.observe(now - request.arrival)
                elif previous is not None:
                    m.itl.observe(now - previous)
                request.last_token[seq.index] = now
                self._undelivered.append((request, delta))
            self._update_gauges()
        for request_id in failed:
            self._finish(request_id, "failed", final_reason="error")
        for request_id, request in list(self._requests.items()):
            seq = request.seq
            samples = [seq, *seq.children]
            if all(s.is_finished for s in samples) and (len(seq.children) == seq.params.n - 1 or not seq.output_ids):
                with m.lock:
                    m.e2e.observe(now - request.arrival)
                self._finish(request_id, "finished")
        if not self.llm.scheduler.has_unfinished():
            self._deliver()  # no next step to deliver them at

    def _finish(self, request_id: str, status: str, final_reason: str | None = None) -> None:
        """Forget a request; final_reason ("error", "abort"): the engine ended it, and its client is told."""
        request = self._requests.pop(request_id)
        self.llm.release(request.seq)
        self._deliver()  # its last tokens before its end
        if final_reason:
            request.push(RequestOutput(request_id, "", [], True, final_reason))
        request.push(None)
        with self._lock:
            self._num_active -= 1
        self.metrics.count_request(status)
        with self.metrics.lock:
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.update_from(self.llm.stats())
