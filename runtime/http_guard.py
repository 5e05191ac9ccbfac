"""What the server checks before a handler runs: the Host header, JSON bodies, body size, slow clients.

- Host: a server bound to a loopback address answers only to loopback names (localhost, *.localhost,
  127.0.0.0/8, ::1) plus the names given to --allowed-hosts, which defeats DNS rebinding; bound to
  another address it answers any Host unless --allowed-hosts narrows it.
- POST bodies must be application/json (415): a web page cannot send that cross-origin without a
  CORS preflight, which this server answers only when --cors-origins allows the page's origin.
- Bodies are read up to a byte limit (413) within a time limit (408).
- A connection must finish its request line and headers within HEADER_TIMEOUT_S (slowloris).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import h11
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmc.runtime.openai_responses import error_body

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


class ClientError(Exception):
    """A request refused before its handler's logic runs: an HTTP status and what to do."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def response(self) -> JSONResponse:
        """The OpenAI-style JSON error response."""
        return JSONResponse(error_body(self.message, code=self.code), status_code=self.status)


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host name designates this machine only."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: lower case, without port or trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [v6]:port
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Which Host headers the server answers."""

    loopback_only: bool  # bound to a loopback address
    names: frozenset[str] = frozenset()  # --allowed-hosts ("*": any)

    @classmethod
    def for_bind(cls, bind_host: str, allowed_hosts: tuple[str, ...] | list[str] = ()) -> HostPolicy:
        """The policy of a server bound to bind_host."""
        return cls(is_loopback(bind_host), frozenset(host_name(h) for h in allowed_hosts if h.strip()))

    def allows(self, header: str | None) -> bool:
        """Whether a request with this Host header (None: absent, HTTP/1.0) is answered."""
        if header is None or "*" in self.names or not (self.loopback_only or self.names):
            return True
        name = host_name(header)
        return name in self.names or is_loopback(name)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """ASGI middleware: refuses a wrong Host (400) and POST bodies that are not JSON (415)."""

    def __init__(self, app, hosts: HostPolicy):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> ClientError | None:
        host = _header(scope, b"host")
        if not self.hosts.allows(host):
            return ClientError(400, f"Host '{host[:100]}' is not served here: this server is bound to a loopback "
                                    "address and answers to localhost names only; behind a proxy, start it with "
                                    "--allowed-hosts NAME", "host_not_allowed")
        if scope["method"] == "POST":
            media = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if media != "application/json":
                return ClientError(415, f"POST bodies must be JSON: send 'Content-Type: application/json' (got "
                                        f"'{media[:60] or 'none'}'; with curl, use --json or -H)",
                                   "unsupported_media_type")
        return None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused early (413) past max_bytes and (408) when it takes over BODY_TIMEOUT_S."""
    timeout_s = BODY_TIMEOUT_S
    too_large = ClientError(413, f"the request body is larger than the server's limit of {max_bytes:,} bytes "
                                 "(start the server with a larger --max-request-bytes)", "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"the request body did not arrive within {timeout_s:.0f} s",
                          "request_timeout") from None
    return b"".join(chunks)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request line and headers take longer than
    HEADER_TIMEOUT_S (uvicorn itself only times out idle kept-alive connections)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # noqa: D102
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on a kept-alive connection starts
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc) -> None:  # noqa: D102
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers in %.0f s", HEADER_TIMEOUT_S)
            self.transport.close()
