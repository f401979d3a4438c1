"""The one timing loop the benchmark scripts share."""
from __future__ import annotations

import time
from collections.abc import Callable


def timed_runs(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall seconds of each of `runs` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times
