"""Wall-clock timing for benchmarks and the demo: median of repeats, after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (each run repeated until it takes ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)
