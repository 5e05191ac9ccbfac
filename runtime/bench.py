"""`llmc bench`: offline throughput and online (HTTP, streaming, Poisson arrivals) serving benchmarks.

The workload is a fixed, seeded list of requests (random prompt tokens, fixed output lengths with
EOS ignored), so every system under test does exactly the same work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload."""

    prompt_ids: list[int]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class BenchSampling:
    """How every request picks its tokens: temperature 0 is greedy (the default, as in vLLM's benchmarks).
    A sampled request i is seeded with i, so runs sample alike, unless seeded is False."""

    temperature: float = 0.0
    top_p: float = 1.0
    seeded: bool = True

    def seed(self, index: int) -> int | None:
        """Request index's seed (None when greedy: a seed would change nothing)."""
        return index if self.seeded and self.temperature > 0 else None


GREEDY = BenchSampling()


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  seed: int = 0) -> list[BenchRequest]:
    """Uniform prompt and output lengths in the given inclusive ranges, seeded."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    return [BenchRequest(rng.integers(100, vocab_size, size=int(p)).tolist(), int(o)) for p, o in zip(prompts, outputs)]


@dataclass(slots=True)
class RequestTrace:
    """When one request arrived and when each of its output tokens arrived."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    num_prompt: int = 0
    status: str = "ok"


def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def summarize(traces: list[RequestTrace], duration: float, extra: dict | None = None) -> dict:
    """Throughput and latency percentiles (milliseconds) of a finished run."""
    ok = [t for t in traces if t.status == "ok" and t.token_times]
    ttft = [t.token_times[0] - t.arrival for t in ok]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in ok if len(t.token_times) > 1]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    out_tokens = sum(len(t.token_times) for t in ok)
    in_tokens = sum(t.num_prompt for t in ok)
    return {"requests": len(traces), "completed": len(ok), "duration_s": duration,
            "output_tokens": out_tokens, "prompt_tokens": in_tokens,
            "output_tok_s": out_tokens / duration, "total_tok_s": (out_tokens + in_tokens) / duration,
            "request_s": len(ok) / duration, "ttft_ms": _pct(ttft), "tpot_ms": _pct(tpot), "itl_ms": _pct(itl),
            **(extra or {})}


def run_offline(llm, workload: list[BenchRequest], structured=None, sampling: BenchSampling = GREEDY) -> dict:
    """All requests queued at once through the Python API; per-token times taken after each step. An LLM
    made with profile_dir also reports `step_time` (runtime/step_profile.py). structured (a StructuredOutput)
    constrains every request: the report then has the constraints' cost per token."""
    from llmc.runtime.engine_stats import EngineCalls
    from llmc.runtime.sequence import SamplingParams
    from llmc.runtime.step_profile import step_time_report

    start = time.perf_counter()
    seqs, traces = [], []
    for i, req in enumerate(workload):
        seqs.append(llm.add_request(req.prompt_ids, SamplingParams(
            max_tokens=req.max_tokens, ignore_eos=True, structured=structured, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed(i))))
        traces.append(RequestTrace(start, num_prompt=len(req.prompt_ids)))
    index = {seq: i for i, seq in enumerate(seqs)}
    usage, waste = [], []
    before = llm.stats()
    done, next_report = 0, max(1, len(seqs) // 10)
    while llm.scheduler.has_unfinished():
        updated = llm.step()
        now = time.perf_counter()
        for seq in updated:
            trace = traces[index[seq]]
            trace.token_times.extend([now] * (len(seq.output_ids) - len(trace.token_times)))  # k+1 with drafts
            done += seq.is_finished
            if done >= next_report:
                log.info("offline bench: %d/%d requests done (%.0f s)", done, len(seqs), now - start)
                next_report += max(1, len(seqs) // 10)
        snapshot = llm.stats()
        usage.append(snapshot.kv_usage)
        waste.append(snapshot.kv_waste)
    duration = time.perf_counter() - start
    for seq in seqs:
        llm.release(seq)
    after = llm.stats()
    timing = after.timing.since(before.timing)
    calls = {path: EngineCalls(c.calls - before.engine_calls[path].calls, c.tokens - before.engine_calls[path].tokens,
                               c.seconds - before.engine_calls[path].seconds) for path, c in after.engine_calls.items()}
    path_seconds = {path: c.seconds for path, c in calls.items()}
    return summarize(traces, duration, {
        "sampling": asdict(sampling),
        "kv_usage_peak": max(usage, default=0.0), "kv_usage_mean": float(np.mean(usage)) if usage else 0.0,
        "kv_waste_mean": float(np.mean(waste)) if waste else 0.0,
        "host_overhead_fraction": timing.host_fraction, "attention": llm.engine.attention,
        "constraint": None if structured is None else {
            "kind": structured.kind, "tokens": timing.constrained_tokens,
            "ms_per_token": 1e3 * timing.constraint_s / max(timing.constrained_tokens, 1),
            "fraction_of_step_time": timing.constraint_s / timing.total_s if timing.total_s else 0.0},
        "gemm_path": llm.engine.gemm_path,
        "engine_calls_by_path": {path: {"calls": c.calls, "tokens": c.tokens, "seconds": c.seconds}
                                 for path, c in calls.items()},
        "step_time": (step_time_report(llm.engine.end_profiling(), path_seconds, duration, llm.engine.calibration_runs)
                      if llm.engine.profiling else None),
        "preemptions": after.preemptions - before.preemptions,
        "prefix_cache_hit_rate": after.prefix_cache.hit_rate,
        "speculation": spec_delta(before.speculation, after.speculation) if after.speculation else None})


def spec_delta(before, after) -> dict:
    """Speculation counters of one run (after - before)."""
    from llmc.runtime.speculative import SpecStats

    counters = [f.name for f in fields(SpecStats) if f.name != "last_k"]
    delta = SpecStats(**{name: getattr(after, name) - getattr(before, name) for name in counters}, last_k=after.last_k)
    return delta.to_dict()


async def _stream_one(client, url: str, model: str | None, req: BenchRequest, trace: RequestTrace,
                      sampling: BenchSampling, index: int) -> None:
    body = {"prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "stream": True, "ignore_eos": True, "return_token_ids": True}
    if (seed := sampling.seed(index)) is not None:
        body["seed"] = seed
    if model:
        body["model"] = model
    trace.arrival = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                trace.status = f"http {response.status_code}"
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                now = time.perf_counter()
                if "token_ids" in choice:  # llmc: exact token counts
                    trace.token_times += [now] * len(choice["token_ids"])
                elif "text" in choice and (choice["text"] or choice.get("finish_reason") is None):
                    trace.token_times.append(now)  # other servers: one streamed chunk = one token
    except Exception as err:  # noqa: BLE001 - a failed request is recorded, the run goes on
        trace.status = f"error {type(err).__name__}"


async def _run_online(url: str, workload: list[BenchRequest], rate: float, model: str | None, seed: int,
                      sampling: BenchSampling) -> dict:
    import httpx

    rng = np.random.default_rng(seed)
    traces = [RequestTrace(0.0, num_prompt=len(r.prompt_ids)) for r in workload]
    limits = httpx.Limits(max_connections=len(workload) + 8, max_keepalive_connections=len(workload) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for i, (req, trace) in enumerate(zip(workload, traces)):
            tasks.append(asyncio.create_task(_stream_one(client, url, model, req, trace, sampling, i)))
            if rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))  # Poisson arrivals
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(traces, duration, {"rate": rate, "sampling": asdict(sampling)})


def run_online(url: str, workload: list[BenchRequest], rate: float = float("inf"), model: str | None = None,
               seed: int = 0, sampling: BenchSampling = GREEDY) -> dict:
    """Stream every request over HTTP (OpenAI completions API) with Poisson arrivals at `rate` req/s.

    llmc reports each chunk's token ids (`return_token_ids`); for other servers each streamed text
    chunk counts as one token (llama.cpp streams a token a chunk). Check `completed` and
    `output_tokens` against the workload to see that nothing was cut short.
    """
    return asyncio.run(_run_online(url, workload, rate, model, seed, sampling))


def plot_sweep(results: list[dict], key: str, path: str) -> str | None:
    """Throughput vs TTFT/TPOT across a sweep, as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'llmc[bench]')")
        return None
    values = [r[key] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(values, [r["output_tok_s"] for r in results], "o-", color="tab:blue")
    ax1.set_xlabel(key)
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax1.set_xscale("log", base=2)
    ax1b = ax1.twinx()
    ax1b.plot(values, [r["tpot_ms"]["p50"] for r in results], "s--", color="tab:red")
    ax1b.set_ylabel("TPOT p50 (ms)", color="tab:red")
    ax1.set_title("throughput and per-token latency")
    ax2.plot([r["ttft_ms"]["p50"] / 1000 for r in results], [r["output_tok_s"] for r in results], "o-")
    for r in results:
        ax2.annotate(f"{key}={r[key]}", (r["ttft_ms"]["p50"] / 1000, r["output_tok_s"]), fontsize=8)
    ax2.set_xlabel("TTFT p50 (s)")
    ax2.set_ylabel("output tokens/s")
    ax2.set_title("the batch-size trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(data) -> str:
    """JSON with dataclasses flattened."""
    return json.dumps(data, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
