"""SIGTERM drains: in-flight streams finish, new requests are refused, the process exits cleanly."""

import json
import signal
import subprocess
import sys
import time

import httpx

from tests.server_harness import free_port


def test_sigterm_drains_in_flight_requests(tiny_bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from llmc.cli import main; main()", "serve", str(tiny_bundle),
                             "--port", str(port), "--max-num-seqs", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        body = {"prompt": "Paged", "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
        tokens, done = 0, False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if tokens == 0:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                        time.sleep(0.3)
                        try:
                            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=5).status_code
                        except httpx.TransportError:
                            refused = "connection refused"
                        assert refused in (503, "connection refused")
                    tokens += 1
                    json.loads(line[6:])
        assert done and tokens >= 300  # the in-flight stream ran to its end
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
