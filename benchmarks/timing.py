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


def interleaved_median_seconds(calls: dict, rounds: int = 3) -> dict:
    """Median seconds of each ``name -> (fn, args)``, timed in turn within each round.

    Calls compared side by side share the machine's load of the moment: round ``r`` times every
    call once before round ``r + 1`` starts. Each is compiled and warmed up first.
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
