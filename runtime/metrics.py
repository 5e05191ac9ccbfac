"""Serving metrics for /metrics, exposed with prometheus-client (one registry per server).

Latency histograms are observed as tokens arrive; the engine's cumulative counters and gauges are copied
from LLM.stats() snapshots and exported by a collector (the engine keeps them, Prometheus reads them).
Names (docs/serving.md lists them): llmc_time_to_first_token_seconds, llmc_inter_token_latency_seconds,
llmc_e2e_request_latency_seconds (histograms); the COUNTERS, llmc_requests_total{status} and the GAUGES below.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmc.runtime.engine_stats import EngineStats
from llmc.runtime.speculative import SpecStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
COUNTERS = {
    "llmc_prompt_tokens_total": "Prompt tokens of admitted requests.",
    "llmc_generation_tokens_total": "Generated tokens delivered.",
    "llmc_preemptions_total": "Sequences preempted (their KV blocks freed, recomputed later).",
    "llmc_prefix_cache_queried_tokens_total": "Prompt tokens looked up in the prefix cache.",
    "llmc_prefix_cache_hit_tokens_total": "Prompt tokens found in the prefix cache.",
    "llmc_steps_total": "Engine steps.",
    "llmc_step_seconds_total": "Wall time of the engine steps.",
    "llmc_engine_seconds_total": "Wall time of the engine calls within the steps.",
    "llmc_decode_steps_total": "Steps that only decode (one new token per sequence).",
    "llmc_decode_step_seconds_total": "Wall time of the decode-only steps.",
    "llmc_spec_draft_tokens_total": "Speculative tokens drafted and verified.",
    "llmc_spec_accepted_tokens_total": "Speculative tokens accepted.",
    "llmc_spec_verifications_total": "Speculative verifications (a sequence's drafts checked in one step).",
    "llmc_spec_draft_seconds_total": "Wall time of drafting.",
    "llmc_spec_verify_seconds_total": "Wall time of the engine calls that verified drafts.",
}
GAUGES = {
    "llmc_requests_running": "Sequences in the running batch.",
    "llmc_requests_waiting": "Sequences waiting for admission.",
    "llmc_kv_cache_usage_ratio": "Fraction of KV blocks in use.",
    "llmc_kv_cache_waste_ratio": "Fraction of allocated KV slots not holding a token.",
    "llmc_prefix_cache_hit_rate": "Prefix-cache hit tokens / queried tokens.",
    "llmc_spec_acceptance_rate": "Accepted / drafted speculative tokens.",
    "llmc_spec_mean_accepted_tokens": "Mean accepted drafts per verification.",
    "llmc_spec_num_tokens": "The speculation's current k.",
}
REQUEST_STATUSES = ("finished", "aborted", "failed", "rejected", "invalid")


class _Snapshot:
    """A collector of the counters and gauges the metrics object holds."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        for name, value in m.counters.items():
            yield CounterMetricFamily(name.removesuffix("_total"), COUNTERS[name], value=value)
        requests = CounterMetricFamily("llmc_requests", "Requests by outcome.", labels=["status"])
        for status, value in m.requests.items():
            requests.add_metric([status], value)
        yield requests
        for name, value in m.gauges.items():
            yield GaugeMetricFamily(name, GAUGES[name], value=value)


class ServingMetrics:
    """Everything /metrics exposes; updated by the engine thread and the HTTP handlers (under `lock`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)

        def histogram(name: str, help_text: str) -> Histogram:
            return Histogram(name, help_text, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("llmc_time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = histogram("llmc_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.")
        self.e2e = histogram("llmc_e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.requests: dict[str, int] = dict.fromkeys(REQUEST_STATUSES, 0)
        self.gauges: dict[str, float] = dict.fromkeys(GAUGES, 0)
        self.registry.register(_Snapshot(self))

    def update_from(self, stats: EngineStats) -> None:
        """The gauges and engine counters from an LLM's snapshot (call with the lock held)."""
        timing, spec = stats.timing, stats.speculation or SpecStats()
        self.gauges.update({"llmc_requests_running": stats.running, "llmc_requests_waiting": stats.waiting,
                            "llmc_kv_cache_usage_ratio": round(stats.kv_usage, 4),
                            "llmc_kv_cache_waste_ratio": round(stats.kv_waste, 4),
                            "llmc_prefix_cache_hit_rate": round(stats.prefix_cache.hit_rate, 4),
                            "llmc_spec_acceptance_rate": round(spec.acceptance_rate, 4),
                            "llmc_spec_mean_accepted_tokens": round(spec.mean_accepted, 4),
                            "llmc_spec_num_tokens": spec.last_k})
        self.counters.update({"llmc_preemptions_total": stats.preemptions,
                              "llmc_prefix_cache_queried_tokens_total": stats.prefix_cache.queried_tokens,
                              "llmc_prefix_cache_hit_tokens_total": stats.prefix_cache.hit_tokens,
                              "llmc_steps_total": timing.steps, "llmc_step_seconds_total": round(timing.total_s, 6),
                              "llmc_engine_seconds_total": round(timing.engine_s, 6),
                              "llmc_decode_steps_total": timing.decode_steps,
                              "llmc_decode_step_seconds_total": round(timing.decode_s, 6),
                              "llmc_spec_draft_tokens_total": spec.proposed,
                              "llmc_spec_accepted_tokens_total": spec.accepted,
                              "llmc_spec_verifications_total": spec.verifications,
                              "llmc_spec_draft_seconds_total": round(spec.draft_s, 6),
                              "llmc_spec_verify_seconds_total": round(spec.verify_s, 6)})

    def count_request(self, status: str) -> None:
        """Count one request by outcome."""
        with self.lock:
            self.requests[status] += 1

    def render(self) -> str:
        """The /metrics body (Prometheus text format 0.0.4)."""
        with self.lock:
            return generate_latest(self.registry).decode()
