"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and fixed-bucket histograms with labels; thread-safe (the batcher thread and the HTTP
handlers both record). Names follow Prometheus conventions: `_total` counters, `_seconds` histograms.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._buckets: dict[str, tuple] = {}
        self._gauges: dict[str, callable] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)

    def histogram(self, name: str, help_text: str, buckets: tuple) -> None:
        self._help[name] = ("histogram", help_text)
        self._buckets[name] = buckets

    def gauge(self, name: str, help_text: str, read, kind: str = "gauge") -> None:
        """A value `read()` returns at scrape time (kind "counter" for a monotonic count kept elsewhere)."""
        self._help[name] = (kind, help_text)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self._buckets[name]
        with self._lock:
            series = self._hist[name].setdefault(key, [[0] * (len(buckets) + 1), 0.0, 0])
            series[0][bisect.bisect_left(buckets, value)] += 1
            series[1] += value
            series[2] += 1

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in sorted(self._help.items()):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if name in self._gauges:
                    lines.append(f"{name} {float(self._gauges[name]()):g}")
                elif kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_labels(dict(key))} {v:g}")
                else:
                    for key, (counts, total, count) in sorted(self._hist[name].items()):
                        labels, running = dict(key), 0
                        for bound, c in zip(self._buckets[name], counts):
                            running += c
                            lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {running}")
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
                        lines.append(f"{name}_sum{_labels(labels)} {total:g}")
                        lines.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"


def add_http_metrics(m: Metrics) -> Metrics:
    """The families the HTTP app records (idempotent)."""
    m.counter("adapt_requests_total", "HTTP detect requests by task and status code")
    m.histogram("adapt_request_seconds", "detect latency by task (receive to response)", LATENCY_BUCKETS)
    return m


def server_metrics() -> Metrics:
    """The families the engine records."""
    m = Metrics()
    m.histogram("adapt_batch_size", "requests per model batch (all tasks together)", BATCH_BUCKETS)
    m.histogram("adapt_batch_seconds", "time to run one model batch", LATENCY_BUCKETS)
    m.counter("adapt_rejected_total", "requests refused before running, by reason (queue_full, deadline)")
    return m
