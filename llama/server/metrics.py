"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own."""

from typing import Callable, Dict, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Gauge name -> (key of `Engine.stats()`, help).
ENGINE_GAUGES = {
    "codellama_requests_running": ("running", "Requests generating in an engine slot"),
    "codellama_requests_waiting": ("waiting", "Requests queued for a slot"),
    "codellama_free_slots": ("free_slots", "Engine slots free"),
    "codellama_kv_cache_blocks_free": (
        "kv_cache_blocks_free",
        "Blocks of a paged KV cache neither reserved by a running request nor caching a prefix (0 unpaged)",
    ),
}
# Counter name (without `_total`) -> (key of `Engine.stats()`, help): totals the engine keeps
# since it started, so they only grow.
ENGINE_COUNTERS = {
    "codellama_speculative_proposed_tokens": (
        "speculative_proposed",
        "Tokens proposed by speculative decoding for the model to check",
    ),
    "codellama_speculative_accepted_tokens": (
        "speculative_accepted",
        "Proposed tokens the model's check accepted",
    ),
}


class _EngineStatsCollector:
    """Gauges and counters read from the engine's `stats()` at scrape time (zero while loading)."""

    def __init__(self, stats: Callable[[], Optional[Dict[str, int]]]):
        self._stats = stats

    def collect(self) -> Iterator[Union[GaugeMetricFamily, CounterMetricFamily]]:
        stats = self._stats() or {}
        for name, (key, help_text) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=stats.get(key, 0))
        for name, (key, help_text) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))


class ServerMetrics:
    """Counters and histograms the request handlers update; engine gauges and counters read on
    scrape.

    Args:
        stats: returns the engine's `stats()` dict, or None before the model is loaded.
    """

    def __init__(self, stats: Callable[[], Optional[Dict[str, int]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "codellama_requests",
            "Generations finished (one per choice), by endpoint and finish reason",
            ["endpoint", "finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            "codellama_request_errors", "Requests answered with an error, by status", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "codellama_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.cached_tokens = Counter(
            "codellama_cached_prompt_tokens",
            "Prompt tokens whose keys and values came from the prefix cache",
            registry=r,
        )
        self.generated_tokens = Counter("codellama_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "codellama_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "codellama_inter_token_latency_seconds",
            "Between consecutive generated tokens of a generation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registry.register(_EngineStatsCollector(stats))

    def count_error(self, status: int) -> None:
        """Count one request answered with the error status `status`."""
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
