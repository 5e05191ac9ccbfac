"""`llmc serve`: an OpenAI-compatible HTTP server over the async engine (starlette + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
POST /tokenize, POST /detokenize (vLLM's), GET /health, GET /metrics, GET /openapi.json. Every error is
OpenAI-style JSON; a full waiting queue answers 429 with Retry-After; a client that disconnects aborts its
request; SIGTERM drains (see DrainingServer).
Requests are parsed, templated and tokenized off the event loop, so a large one never stalls others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmc.errors import RequestError
from llmc.runtime import openai_protocol as oa
from llmc.runtime import openai_responses as out
from llmc.runtime import tokenize_api as tk
from llmc.runtime import tool_calls
from llmc.runtime.async_engine import AsyncEngine, Overloaded
from llmc.runtime.http_guard import ClientError, HeaderTimeoutProtocol, HostPolicy, RequestGuard, read_body
from llmc.runtime.llm import KV_CACHE_FULL
from llmc.runtime.openai_logprobs import CompletionLogprobs, chat_logprobs
from llmc.runtime.openapi import openapi_spec
from llmc.runtime.request_prep import Prepared, prepare

log = logging.getLogger(__name__)

RETRY_AFTER_DRAINING_S = 5
# Finish reasons with which the server itself ended a request: (status when not streaming, message).
ENDED_BY_SERVER = {"error": (500, "the engine failed while generating this request"),
                   "abort": (503, "the server shut down before this request finished (drain timeout)")}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the server admits requests (the CLI's serve options; defaults for in-process servers)."""

    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    default_max_tokens: int = 16  # completions (OpenAI's default); chat defaults to the rest of the context
    drain_timeout_s: float = 30.0


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(out.error_body(message, kind, code, param), status_code=status, headers=headers)


def _draining_response() -> JSONResponse:
    return error_response(503, "the server is shutting down; retry on another replica or later", "server_error",
                          "shutting_down", headers={"Retry-After": str(RETRY_AFTER_DRAINING_S)})


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Handlers:
    """The route handlers, sharing the engine and the server's settings."""

    def __init__(self, engine: AsyncEngine, model_name: str, config: ServerConfig):
        self.engine, self.model_name, self.config = engine, model_name, config
        self._expected_auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self.draining = False
        self.num_in_flight = 0  # admitted generate requests whose responses are not finished yet
        self.created = int(time.time())

    def _denied(self, request: Request) -> Response | None:
        given = request.headers.get("authorization", "").encode("latin-1")
        if self._expected_auth and not hmac.compare_digest(given, self._expected_auth):  # constant time
            return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  "authentication_error", "invalid_api_key")
        return None

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_DRAINING_S)})
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmc",
             "root": self.model_name, "parent": None, "max_model_len": self.engine.llm.geometry.max_position}]})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_spec())

    async def tokenize(self, request: Request) -> Response:
        return await self._auxiliary(request, lambda body: tk.tokenize(self.engine.llm, body, self.model_name))

    async def detokenize(self, request: Request) -> Response:
        return await self._auxiliary(request, lambda body: tk.detokenize(self.engine.llm, body, self.model_name))

    async def _auxiliary(self, request: Request, handle) -> Response:
        """A request that does not generate: read, handled on a worker thread, answered as JSON."""
        if denied := self._denied(request):
            return denied
        try:
            raw = await read_body(request, self.config.max_request_bytes)
            return JSONResponse(await asyncio.to_thread(handle, oa.parse_json(raw)))
        except ClientError as err:
            return err.response()
        except RequestError as err:
            return error_response(400, str(err), param=err.param)

    async def metrics(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if denied := self._denied(request):
            return denied
        if self.draining:
            return _draining_response()
        try:
            raw = await read_body(request, self.config.max_request_bytes)
            prepared = await asyncio.to_thread(prepare, self.engine.llm, raw, chat, self.model_name,
                                               self.config.default_max_tokens)
        except ClientError as err:
            self.engine.metrics.count_request("invalid")
            return err.response()
        except RequestError as err:
            self.engine.metrics.count_request("invalid")
            return error_response(400, str(err), param=err.param)
        if self.draining:  # SIGTERM arrived while this request was being read
            return _draining_response()
        req, prompt_ids = prepared.request, prepared.prompt_ids
        try:
            request_id, deltas = self.engine.submit(prompt_ids, prepared.params)
        except Overloaded as err:
            self.engine.metrics.count_request("rejected")
            return error_response(429, f"server over capacity ({err}); retry later", "rate_limit_error",
                                  headers={"Retry-After": "1"})
        response_id = out.new_id("chatcmpl" if chat else "cmpl")
        self.num_in_flight += 1
        if req.stream:
            return StreamingResponse(self._stream(request_id, response_id, deltas, prepared, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await self._collect(request, request_id, response_id, deltas, prepared, chat)
        finally:
            self.num_in_flight -= 1

    def _finish_detail(self, reason: str | None) -> str | None:
        if reason != KV_CACHE_FULL:
            return None
        pool = self.engine.llm.pool
        return (f"the sequence outgrew the whole KV cache ({pool.num_blocks * pool.block_size:,} tokens); "
                "the server needs a larger --kv-cache-memory")

    def _choice(self, index, text, reason, chat, chunk, req, token_ids, first=False, logprobs=None,
                tool_calls=None) -> dict:
        return out.choice(index, text, reason, chat, chunk, first=first,
                          token_ids=token_ids if req.return_token_ids else None,
                          finish_detail=self._finish_detail(reason), logprobs=logprobs, tool_calls=tool_calls)

    def _logprobs(self, prepared: Prepared, chat: bool, delta, completion: CompletionLogprobs | None) -> dict | None:
        """One delta's (or a whole choice's) logprobs object, None where none were asked for."""
        if delta.logprobs is None:
            return None
        if chat:
            return chat_logprobs(self.engine.llm.tokenizer, delta.logprobs)
        if delta.prompt_logprobs is not None:  # echo: the prompt's tokens first, the first one without a logprob
            return completion.block(delta.prompt_logprobs + delta.logprobs, first_token=prepared.prompt_ids[0])
        return completion.block(delta.logprobs)

    async def _collect(self, request, request_id, response_id, deltas, prepared: Prepared, chat) -> Response:
        req = prepared.request
        texts: dict[int, str] = defaultdict(lambda: prepared.echo or "")
        tokens: dict[int, list[int]] = defaultdict(list)
        reasons: dict[int, str | None] = {}
        logprobs: dict[int, list] = defaultdict(list)
        prompt_logprobs: dict[int, list] = {}

        async def gather() -> None:
            while (item := await deltas.get()) is not None:
                texts[item.index] += item.text
                tokens[item.index] += item.token_ids
                logprobs[item.index] += item.logprobs or []
                if item.prompt_logprobs is not None:
                    prompt_logprobs[item.index] = item.prompt_logprobs
                if item.finished:
                    reasons[item.index] = item.finish_reason

        work = asyncio.ensure_future(gather())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client went away: free its blocks now
            work.cancel()
            self.engine.abort(request_id)
            return Response(status_code=499)
        watcher.cancel()
        for reason, (status, message) in ENDED_BY_SERVER.items():
            if reason in reasons.values():
                return error_response(status, message, "server_error", "shutting_down" if reason == "abort" else None)
        num_choices = req.n or 1
        wanted = prepared.params.logprobs is not None
        choices = []
        for i in range(num_choices):
            whole = _Whole(logprobs[i] if wanted else None, prompt_logprobs.get(i, prompt_logprobs.get(0)))
            lp = self._logprobs(prepared, chat, whole, CompletionLogprobs(self.engine.llm.tokenizer))
            text, calls = tool_calls.parse(texts[i]) if prepared.tools else (texts[i], None)
            choices.append(self._choice(i, text, reasons.get(i, reasons.get(0)), chat, False, req, tokens[i],
                                        logprobs=lp, tool_calls=calls or None))
        num_tokens = sum(len(t) for t in tokens.values())
        return JSONResponse(out.completion_body(response_id, self.model_name, choices,
                                                out.usage(len(prepared.prompt_ids), num_tokens), chat, chunk=False))

    async def _stream(self, request_id, response_id, deltas, prepared: Prepared, chat):
        req, num_prompt = prepared.request, len(prepared.prompt_ids)
        completed, num_tokens, first = False, 0, defaultdict(lambda: True)
        offsets = defaultdict(lambda: CompletionLogprobs(self.engine.llm.tokenizer))
        parsers = defaultdict(tool_calls.StreamParser)  # with tools: calls out of each choice's text
        try:
            while (item := await deltas.get()) is not None:
                if item.finish_reason in ENDED_BY_SERVER:
                    message = ENDED_BY_SERVER[item.finish_reason][1]
                    yield f"data: {json.dumps(out.error_body(message, 'server_error', item.finish_reason))}\n\n"
                    break
                num_tokens += len(item.token_ids)
                echo = prepared.echo if first[item.index] and prepared.echo is not None else ""
                if item.token_ids or item.finished or (first[item.index] and (chat or echo)):
                    reason = item.finish_reason if item.finished else None
                    logprobs = self._logprobs(prepared, chat, item, offsets[item.index])
                    text, calls = echo + item.text, None
                    if prepared.tools:
                        text, calls = parsers[item.index].feed(item.text, item.finished)
                        if reason == "stop" and parsers[item.index].num_calls:
                            reason = "tool_calls"
                    choice = self._choice(item.index, text, reason, chat, True, req, item.token_ids,
                                          first=first[item.index], logprobs=logprobs, tool_calls=calls or None)
                    first[item.index] = False
                    body = out.completion_body(response_id, self.model_name, [choice], None, chat, chunk=True)
                    yield f"data: {json.dumps(body)}\n\n"
            if req.include_usage:
                usage = out.usage(num_prompt, num_tokens)
                body = out.completion_body(response_id, self.model_name, [], usage, chat, chunk=True)
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            self.num_in_flight -= 1
            if not completed:  # the client disconnected mid-stream: abort and free its blocks
                self.engine.abort(request_id)


@dataclass(frozen=True, slots=True)
class _Whole:
    """A whole choice's logprobs, shaped as a delta for Handlers._logprobs."""

    logprobs: list | None
    prompt_logprobs: list | None


def create_app(engine: AsyncEngine, model_name: str, config: ServerConfig | None = None,
               bind_host: str = "127.0.0.1") -> tuple[RequestGuard, Handlers]:
    """The ASGI app and its handlers (`handlers.draining` refuses new requests)."""
    config = config or ServerConfig()
    h = Handlers(engine, model_name, config)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code=str(exc.status_code))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (logged on the server)", "server_error")

    routes = [Route("/health", h.health), Route("/v1/models", h.models), Route("/metrics", h.metrics),
              Route("/v1/completions", h.completions, methods=["POST"]),
              Route("/v1/chat/completions", h.chat, methods=["POST"]),
              Route("/tokenize", h.tokenize, methods=["POST"]), Route("/detokenize", h.detokenize, methods=["POST"]),
              Route("/openapi.json", h.openapi)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False  # a redirect would echo the client's Host header into Location
    inner = app
    if config.cors_origins:
        inner = CORSMiddleware(app, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"])
    return RequestGuard(inner, HostPolicy.for_bind(bind_host, config.allowed_hosts)), h


def _uvicorn_config(app, host: str, port: int, **kwargs) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", backlog=2048, http=HeaderTimeoutProtocol,
                          **kwargs)


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT drain: the listener keeps answering (503 + Retry-After for new work, /health
    "draining") while in-flight requests finish; when the drain timeout ends (or on a second
    signal) the rest are ended with an error event and [DONE]; then the server exits with status 0."""

    def __init__(self, config: uvicorn.Config, handlers: Handlers):
        super().__init__(config)
        self.handlers, self.drain_timeout_s = handlers, handlers.config.drain_timeout_s
        self.drain_deadline: float | None = None
        self._aborted_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None:
            log.warning("shutting down: draining %d in-flight requests (at most %.0f s)",
                        self.handlers.engine.num_active, self.drain_timeout_s)
            self.handlers.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
        else:  # a second signal: end the in-flight requests now
            self.drain_deadline = time.monotonic()
        # uvicorn re-raises captured signals after shutdown; a drained shutdown is a clean exit (status 0).
        getattr(self, "_captured_signals", []).clear()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            engine, now = self.handlers.engine, time.monotonic()
            if engine.num_active == 0 and self.handlers.num_in_flight == 0:
                self.should_exit = True
            elif now >= self.drain_deadline and self._aborted_at is None:
                log.warning("drain timeout: ending %d in-flight requests", engine.num_active)
                engine.abort_all()
                self._aborted_at = now
            elif self._aborted_at is not None and now - self._aborted_at > 5.0:
                self.should_exit = True  # the engine did not answer the abort: stop anyway
        return await super().on_tick(counter)


@contextlib.contextmanager
def serve_in_thread(engine: AsyncEngine, model_name: str, config: ServerConfig | None = None,
                    start_timeout: float = 30.0) -> Iterator[str]:
    """Run the server on an ephemeral loopback port in a background thread; yields its base URL.

    For in-process clients (`llmc bench --mode online`, tests). Stops server and engine on exit.
    """
    app, _ = create_app(engine, model_name, config)
    server = uvicorn.Server(_uvicorn_config(app, "127.0.0.1", 0))
    engine.start()
    thread = threading.Thread(target=server.run, name="llmc-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the in-process HTTP server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def serve(engine: AsyncEngine, model_name: str, host: str, port: int, config: ServerConfig) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and stop the engine."""
    app, handlers = create_app(engine, model_name, config, bind_host=host)
    # After the drain only finished responses are flushing: a short grace for them.
    server = DrainingServer(_uvicorn_config(app, host, port, timeout_graceful_shutdown=5), handlers)
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()
