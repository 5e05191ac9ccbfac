"""Batch-1 streaming through an OpenAI-compatible server: TTFT and inter-token gaps.

    python benchmarks/http_batch1.py http://127.0.0.1:8000 [--requests 5] [--tokens 128]

Greedy, EOS ignored, one request at a time after a warm-up; reports medians (ms). Run the servers
being compared one after another on the same machine, never side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

PROMPT = "The history of the printing press begins"


def measure(url: str, requests: int, tokens: int) -> dict:
    """TTFT and inter-token gaps of `requests` streamed completions (plus one warm-up)."""
    ttfts, gaps = [], []
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    for i in range(requests + 1):
        start, times = time.perf_counter(), []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        if i:  # the first request warms the server up
            ttfts.append(times[0] - start)
            gaps += [b - a for a, b in zip(times, times[1:])]
    return {"url": url, "requests": requests, "tokens": tokens, "ttft_ms_p50": 1000 * statistics.median(ttfts),
            "itl_ms_p50": 1000 * statistics.median(gaps), "itl_ms_mean": 1000 * statistics.mean(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(json.dumps(measure(args.url.rstrip("/"), args.requests, args.tokens), indent=2))


if __name__ == "__main__":
    main()
