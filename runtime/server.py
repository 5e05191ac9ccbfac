"""`llmc serve`: an OpenAI-compatible HTTP server over the async engine (starlette + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
GET /health, GET /metrics. Errors are OpenAI-style JSON; a full waiting queue answers 429 with
Retry-After; a client that disconnects aborts its request; SIGTERM drains in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmc.errors import RequestError
from llmc.runtime import openai_protocol as oa
from llmc.runtime.async_engine import AsyncEngine, Overloaded

log = logging.getLogger(__name__)


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Handlers:
    """The route handlers, sharing the engine and the server's settings."""

    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None, default_max_tokens: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.default_max_tokens = default_max_tokens
        self.draining = False
        self.created = int(time.time())

    def _denied(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  "authentication_error", "invalid_api_key")
        return None

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmc"}]})

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
            return error_response(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.engine.metrics.count_request("invalid")
            return error_response(400, "the request body is not valid JSON")
        try:
            req = oa.parse_request(oa.ChatRequest if chat else oa.CompletionRequest, body)
            if req.model and req.model != self.model_name:
                return error_response(404, f"model '{req.model}' does not exist; this server serves "
                                           f"'{self.model_name}'", code="model_not_found")
            llm = self.engine.llm
            if chat:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                prompt = llm.tokenizer.apply_chat_template(messages)
            else:
                prompt = req.single_prompt()
            prompt_ids = llm.validate_prompt(prompt)
            params = req.sampling_params(self.default_max_tokens)
        except RequestError as err:
            self.engine.metrics.count_request("invalid")
            return error_response(400, str(err))
        try:
            request_id, deltas = self.engine.submit(prompt_ids, params)
        except Overloaded as err:
            self.engine.metrics.count_request("rejected")
            return error_response(429, f"server over capacity ({err}); retry later", "rate_limit_error",
                                  headers={"Retry-After": "1"})
        response_id = oa.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(self._stream(request_id, response_id, deltas, len(prompt_ids), req, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect(request, request_id, response_id, deltas, len(prompt_ids), req, chat)

    async def _collect(self, request, request_id, response_id, deltas, num_prompt, req, chat) -> Response:
        texts: dict[int, str] = defaultdict(str)
        tokens: dict[int, list[int]] = defaultdict(list)
        reasons: dict[int, str | None] = {}

        async def gather() -> None:
            while (item := await deltas.get()) is not None:
                texts[item.index] += item.text
                tokens[item.index] += item.token_ids
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
        if "error" in reasons.values():
            return error_response(500, "the engine failed while generating this request", "server_error")
        choices = [oa.choice(i, texts[i], reasons.get(i), chat, chunk=False,
                             token_ids=tokens[i] if req.return_token_ids else None) for i in sorted(texts)]
        num_tokens = sum(len(t) for t in tokens.values())
        return JSONResponse(oa.completion_body(response_id, self.model_name, choices,
                                               oa.usage(num_prompt, num_tokens), chat, chunk=False))

    async def _stream(self, request_id, response_id, deltas, num_prompt, req, chat):
        completed, num_tokens, first = False, 0, defaultdict(lambda: True)
        try:
            while (item := await deltas.get()) is not None:
                if item.finish_reason == "error":
                    yield f"data: {json.dumps({'error': {'message': 'engine failure', 'type': 'server_error'}})}\n\n"
                    break
                num_tokens += len(item.token_ids)
                if item.token_ids or item.finished or (chat and first[item.index]):
                    reason = item.finish_reason if item.finished else None
                    choice = oa.choice(item.index, item.text, reason, chat, chunk=True, first=first[item.index],
                                       token_ids=item.token_ids if req.return_token_ids else None)
                    first[item.index] = False
                    body = oa.completion_body(response_id, self.model_name, [choice], None, chat, chunk=True)
                    yield f"data: {json.dumps(body)}\n\n"
            if req.include_usage:
                usage = oa.usage(num_prompt, num_tokens)
                body = oa.completion_body(response_id, self.model_name, [], usage, chat, chunk=True)
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:  # the client disconnected mid-stream: abort and free its blocks
                self.engine.abort(request_id)


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 16) -> Starlette:
    """The ASGI app; `app.state.handlers.draining` refuses new requests."""
    h = Handlers(engine, model_name, api_key, default_max_tokens)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code=str(exc.status_code))

    routes = [Route("/health", h.health), Route("/v1/models", h.models), Route("/metrics", h.metrics),
              Route("/v1/completions", h.completions, methods=["POST"]),
              Route("/v1/chat/completions", h.chat, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.handlers = h
    return app


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests at once, let in-flight ones finish (bounded)."""

    def __init__(self, config: uvicorn.Config, handlers: Handlers):
        super().__init__(config)
        self.handlers = handlers

    def handle_exit(self, sig, frame) -> None:
        if not self.handlers.draining:
            log.warning("shutting down: draining %d in-flight requests", self.handlers.engine.num_active)
        self.handlers.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown; a drained shutdown is a clean exit (status 0).
        getattr(self, "_captured_signals", []).clear()


@contextlib.contextmanager
def serve_in_thread(engine: AsyncEngine, model_name: str, api_key: str | None = None,
                    start_timeout: float = 30.0) -> Iterator[str]:
    """Run the server on an ephemeral loopback port in a background thread; yields its base URL.

    For in-process clients (`llmc bench --mode online`, tests). Stops server and engine on exit.
    """
    config = uvicorn.Config(create_app(engine, model_name, api_key), host="127.0.0.1", port=0,
                            log_level="warning", backlog=2048)
    server = uvicorn.Server(config)
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


def serve(engine: AsyncEngine, model_name: str, host: str, port: int, api_key: str | None,
          drain_timeout: float = 30.0, default_max_tokens: int = 16) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and stop the engine."""
    app = create_app(engine, model_name, api_key, default_max_tokens)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=drain_timeout, backlog=2048)
    engine.start()
    try:
        DrainingServer(config, app.state.handlers).run()
    finally:
        engine.stop()
