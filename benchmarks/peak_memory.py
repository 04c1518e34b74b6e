"""Peak extra memory of one compiled call, measured in the calling (fresh) process.

CPU: the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) is
reset to the current RSS through ``/proc/self/clear_refs`` after compilation,
so the peak counts the execution alone. glibc's mmap threshold is pinned by
the parent (``MALLOC_MMAP_THRESHOLD_``) so large buffers are returned to the OS
when freed and memory freed by compilation is not silently reused.
GPU: ``memory_stats()['peak_bytes_in_use']`` minus bytes in use before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time

import jax

# Environment for the measuring subprocess (see module docstring).
SUBPROCESS_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024),
    "MALLOC_ARENA_MAX": "2",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so a call that reuses them is charged for them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mmap threshold above still applies
        pass


def measure(compiled, *args) -> tuple[int, float]:
    """Run ``compiled(*args)`` once; return ``(peak extra bytes, seconds)``."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        _release_free_heap()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds = time.perf_counter() - start
        return (_status_kib("VmHWM") - before) * 1024, seconds
    stats = device.memory_stats() or {}
    before = stats.get("bytes_in_use", 0)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    return max(peak - before, 0), seconds


def env() -> dict:
    return {**os.environ, **SUBPROCESS_ENV}
