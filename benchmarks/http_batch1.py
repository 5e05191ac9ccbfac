"""Batch-1 streaming through an OpenAI-compatible server: TTFT and inter-token gaps.

    python benchmarks/http_batch1.py http://127.0.0.1:8000 [--requests 5] [--tokens 128]

Greedy, EOS ignored, one request at a time after a warm-up; reports medians (ms). Run the servers
being compared one after another on the same machine, never side by side. Against llmc it also reads
/metrics before and after: `decode_step_ms` is the server's own mean decode step over the measured
requests (LLM.step: scheduling, engine call, sampling), and `serving_overhead` = itl_ms_mean /
decode_step_ms - 1, the HTTP path's share of a token measured in the same run (so immune to this
machine's drift between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

PROMPT = "The history of the printing press begins"


STEP_COUNTERS = ("llmc_decode_steps_total", "llmc_decode_step_seconds_total")


def step_counters(url: str) -> dict[str, float] | None:
    """llmc's step counters from /metrics; None for a server without them."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    values = {}
    for line in response.text.splitlines() if response.status_code == 200 else []:
        name, _, value = line.partition(" ")
        if name in STEP_COUNTERS:
            values[name] = float(value)
    return values if len(values) == len(STEP_COUNTERS) else None


def measure(url: str, requests: int, tokens: int) -> dict:
    """TTFT and inter-token gaps of `requests` streamed completions (plus one warm-up)."""
    ttfts, gaps = [], []
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    before = None
    for i in range(requests + 1):
        if i == 1:
            before = step_counters(url)
        start, times = time.perf_counter(), []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        if i:  # the first request warms the server up
            ttfts.append(times[0] - start)
            gaps += [b - a for a, b in zip(times, times[1:])]
    result = {"url": url, "requests": requests, "tokens": tokens, "ttft_ms_p50": 1000 * statistics.median(ttfts),
              "itl_ms_p50": 1000 * statistics.median(gaps), "itl_ms_mean": 1000 * statistics.mean(gaps)}
    after = step_counters(url) if before is not None else None
    if after is not None and after["llmc_decode_steps_total"] > before["llmc_decode_steps_total"]:
        steps = after["llmc_decode_steps_total"] - before["llmc_decode_steps_total"]
        seconds = after["llmc_decode_step_seconds_total"] - before["llmc_decode_step_seconds_total"]
        result["decode_step_ms"] = 1000 * seconds / steps
        result["serving_overhead"] = result["itl_ms_mean"] / result["decode_step_ms"] - 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(json.dumps(measure(args.url.rstrip("/"), args.requests, args.tokens), indent=2))


if __name__ == "__main__":
    main()
