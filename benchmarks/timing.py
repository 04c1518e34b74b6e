"""Wall-clock timing of a jitted call: one warm-up (compile) run, then the median of repeats."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
