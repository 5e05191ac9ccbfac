"""SIGTERM drains: the listener keeps answering (503 + Retry-After, /health "draining") while in-flight
requests finish; past the drain timeout they end with an error event and [DONE]; exit status 0."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.llm import LLM
from llmc.runtime.server import DrainingServer, ServerConfig, _uvicorn_config, create_app
from tests.server_harness import free_port


def _wait_healthy(url: str, proc=None, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline and (proc is None or proc.poll() is None), "server did not start"
        time.sleep(0.05)


def test_sigterm_drains_in_flight_requests(tiny_bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from llmc.cli import main; main()", "serve", str(tiny_bundle),
                             "--port", str(port), "--max-num-seqs", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        # 16 samples x 400 tokens: more SSE than the socket buffers hold while this client pauses
        body = {"prompt": "Paged", "max_tokens": 400, "temperature": 0.8, "seed": 1, "n": 16, "stream": True,
                "ignore_eos": True, "return_token_ids": True}
        tokens, done = 0, False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if tokens == 0:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                        time.sleep(0.5)
                        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=5)
                        health = httpx.get(f"{url}/health", timeout=5)
                    event = json.loads(line[6:])
                    assert "error" not in event
                    tokens += len(event["choices"][0]["token_ids"])
        assert done and tokens == 16 * 400  # the in-flight stream ran to its end
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_timeout_ends_in_flight_requests_with_an_error_and_done(tiny_bundle):
    llm = LLM(tiny_bundle, max_num_seqs=4)
    step = llm.step

    def slow_step():  # 400 tokens now take ~8 s: far past the drain timeout
        time.sleep(0.02)
        return step()

    llm.step = slow_step
    engine = AsyncEngine(llm)
    app, handlers = create_app(engine, "tiny", ServerConfig(drain_timeout_s=0.5))
    server = DrainingServer(_uvicorn_config(app, "127.0.0.1", free_port(), timeout_graceful_shutdown=5), handlers)
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        _wait_healthy(url)
        body = {"prompt": "Paged", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

        async def go():
            async with httpx.AsyncClient(timeout=60) as client:
                async def stream():
                    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                        return [line async for line in r.aiter_lines() if line]

                tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(
                    client.post(f"{url}/v1/completions", json=body))]
                await asyncio.sleep(0.5)
                server.handle_exit(signal.SIGTERM, None)
                started = time.monotonic()
                lines, whole = await asyncio.gather(*tasks)
                return lines, whole, time.monotonic() - started

        lines, whole, seconds = asyncio.run(go())
        assert seconds < 5  # ended by the drain timeout, not by running to max_tokens
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "abort"
        assert whole.status_code == 503 and whole.json()["error"]["code"] == "shutting_down"
        thread.join(timeout=15)
        assert not thread.is_alive()
        bm = llm.block_manager
        assert bm.num_free_blocks == bm.num_blocks and engine.num_active == 0
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.stop()
