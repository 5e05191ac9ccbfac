"""Run llmc's HTTP server on a loopback port inside the test process."""

from __future__ import annotations

import contextlib
import socket
import time

from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.server import ServerConfig, serve_in_thread


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(llm, api_key=None, max_waiting=256, model_name="tiny", **config):
    """Yield (base_url, engine) while a server runs in a background thread (config: ServerConfig fields)."""
    engine = AsyncEngine(llm, max_waiting=max_waiting)
    with serve_in_thread(engine, model_name, ServerConfig(api_key=api_key, **config)) as url:
        yield url, engine


def wait_idle(engine, timeout=20.0) -> None:
    """Wait until the engine has no request in flight."""
    deadline = time.time() + timeout
    while engine.num_active or engine.llm.scheduler.has_unfinished():
        assert time.time() < deadline, f"{engine.num_active} requests still in flight"
        time.sleep(0.02)
