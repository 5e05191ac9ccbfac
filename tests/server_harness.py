"""Run llmc's HTTP server on a loopback port inside the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.server import create_app


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(llm, api_key=None, max_waiting=256, model_name="tiny"):
    """Yield (base_url, engine) while a server runs in a background thread."""
    engine = AsyncEngine(llm, max_waiting=max_waiting)
    engine.start()
    app = create_app(engine, model_name, api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", backlog=1024))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        engine.stop()


def wait_idle(engine, timeout=20.0) -> None:
    """Wait until the engine has no request in flight."""
    deadline = time.time() + timeout
    while engine.num_active or engine.llm.scheduler.has_unfinished():
        assert time.time() < deadline, f"{engine.num_active} requests still in flight"
        time.sleep(0.02)
