"""Serving metrics in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import bisect
import threading

from llmc.runtime.engine_stats import EngineStats
from llmc.runtime.speculative import SpecStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)


class Histogram:
    """Cumulative-bucket histogram."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        """Prometheus exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {self.count}"]
        return lines


class ServingMetrics:
    """Everything /metrics exposes; updated by the engine thread and the HTTP handlers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = Histogram("llmc_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.")
        self.e2e = Histogram("llmc_e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.counters = {"llmc_prompt_tokens_total": 0, "llmc_generation_tokens_total": 0,
                         "llmc_preemptions_total": 0, "llmc_prefix_cache_queried_tokens_total": 0,
                         "llmc_prefix_cache_hit_tokens_total": 0,
                         # engine steps: their wall time, the engine calls' share of it, and the steps that
                         # only decode (one new token per sequence) with their wall time
                         "llmc_steps_total": 0, "llmc_step_seconds_total": 0.0, "llmc_engine_seconds_total": 0.0,
                         "llmc_decode_steps_total": 0, "llmc_decode_step_seconds_total": 0.0,
                         # speculative decoding
                         "llmc_spec_draft_tokens_total": 0, "llmc_spec_accepted_tokens_total": 0,
                         "llmc_spec_verifications_total": 0, "llmc_spec_draft_seconds_total": 0.0,
                         "llmc_spec_verify_seconds_total": 0.0}
        self.requests = {"finished": 0, "aborted": 0, "failed": 0, "rejected": 0, "invalid": 0}
        self.gauges = {"llmc_requests_running": 0, "llmc_requests_waiting": 0, "llmc_kv_cache_usage_ratio": 0.0,
                       "llmc_kv_cache_waste_ratio": 0.0, "llmc_prefix_cache_hit_rate": 0.0,
                       "llmc_spec_acceptance_rate": 0.0, "llmc_spec_mean_accepted_tokens": 0.0,
                       "llmc_spec_num_tokens": 0}

    def update_from(self, stats: EngineStats) -> None:
        """The gauges and engine counters from an LLM's snapshot (call with the lock held)."""
        self.gauges.update({"llmc_requests_running": stats.running, "llmc_requests_waiting": stats.waiting,
                            "llmc_kv_cache_usage_ratio": round(stats.kv_usage, 4),
                            "llmc_kv_cache_waste_ratio": round(stats.kv_waste, 4),
                            "llmc_prefix_cache_hit_rate": round(stats.prefix_cache.hit_rate, 4)})
        timing, spec = stats.timing, stats.speculation or SpecStats()
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
        self.gauges.update({"llmc_spec_acceptance_rate": round(spec.acceptance_rate, 4),
                            "llmc_spec_mean_accepted_tokens": round(spec.mean_accepted, 4),
                            "llmc_spec_num_tokens": spec.last_k})

    def count_request(self, status: str) -> None:
        """Count one request by outcome."""
        with self.lock:
            self.requests[status] += 1

    def render(self) -> str:
        """The /metrics body."""
        with self.lock:
            lines = []
            for hist in (self.ttft, self.itl, self.e2e):
                lines += hist.render()
            for name, value in self.counters.items():
                lines += [f"# TYPE {name} counter", f"{name} {value}"]
            lines.append("# TYPE llmc_requests_total counter")
            lines += [f'llmc_requests_total{{status="{k}"}} {v}' for k, v in self.requests.items()]
            for name, value in self.gauges.items():
                lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
