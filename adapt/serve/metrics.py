"""Server metrics through `prometheus_client`: one registry per server, rendered in the Prometheus text format.

Counters and fixed-bucket histograms with declared label names, plus values read at scrape time (queue
depth, adapter cache). The client library does the exposition, label escaping included (a label value
with a newline or a quote cannot corrupt the output). Names follow Prometheus conventions: `_total`
counters, `_seconds` histograms.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ReadAtScrape:
    """A collector of values kept elsewhere (the pool's counts, the queue), read when /metrics is scraped."""

    def __init__(self):
        self.reads: dict[str, tuple[str, str, callable]] = {}

    def collect(self):
        for name, (kind, help_text, read) in sorted(self.reads.items()):
            if kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), help_text)
            else:
                family = GaugeMetricFamily(name, help_text)
            family.add_metric([], float(read()))
            yield family


class Metrics:
    """The metric families of one server (thread-safe: prometheus_client locks every update)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self._families: dict[str, Counter | Histogram] = {}
        self._reads = _ReadAtScrape()
        self.registry.register(self._reads)

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        if name not in self._families:
            self._families[name] = Counter(name, help_text, labels, registry=self.registry)

    def histogram(self, name: str, help_text: str, buckets: tuple, labels: tuple[str, ...] = ()) -> None:
        if name not in self._families:
            self._families[name] = Histogram(name, help_text, labels, buckets=buckets, registry=self.registry)

    def gauge(self, name: str, help_text: str, read, kind: str = "gauge") -> None:
        """A value `read()` returns at scrape time (kind "counter" for a monotonic count kept elsewhere)."""
        self._reads.reads[name] = (kind, help_text, read)

    def _series(self, name: str, labels: dict):
        family = self._families[name]
        return family.labels(**labels) if labels else family

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        self._series(name, labels).inc(value)

    def observe(self, name: str, value: float, **labels) -> None:
        self._series(name, labels).observe(value)

    def value(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def add_http_metrics(m: Metrics) -> Metrics:
    """The families the HTTP app records (idempotent)."""
    m.counter("adapt_requests_total", "HTTP detect requests by task and the status code sent", ("code", "task"))
    m.counter("adapt_http_responses_total", "HTTP responses by route, method and the status code sent",
              ("code", "method", "route"))
    m.histogram("adapt_request_seconds", "detect latency by task (receive to response)", LATENCY_BUCKETS, ("task",))
    return m


def server_metrics() -> Metrics:
    """The families the engine records."""
    m = Metrics()
    m.histogram("adapt_batch_size", "requests per model batch (all tasks together)", BATCH_BUCKETS)
    m.histogram("adapt_batch_seconds", "time to run one model batch", LATENCY_BUCKETS)
    m.counter("adapt_rejected_total", "requests refused before running, by reason (tenant_over_share, queue_full, "
                                      "deadline)", ("reason",))
    m.counter("adapt_tenant_compute_seconds_total", "measured batch time charged to each tenant (fair queuing)",
              ("tenant",))
    m.counter("adapt_tenant_requests_total", "requests of each tenant that reached the model", ("tenant",))
    m.counter("adapt_tenant_batches_total", "model batches that held requests of each tenant", ("tenant",))
    m.counter("adapt_adapter_failures_total", "run-time failures of an adapter's requests retried on their own",
              ("task",))
    return m
