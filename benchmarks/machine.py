"""A one-line description of the machine a benchmark ran on, for every committed number."""

from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def describe() -> str:
    """E.g. ``'CPU: 2 cores, Intel Xeon ..., 23.4 GiB RAM; jax 0.10.2 (cpu)'``."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        mem = _total_memory_gib()
        mem_s = f", {mem:.1f} GiB RAM" if mem else ""
        where = f"CPU: {os.cpu_count()} cores, {_cpu_model()}{mem_s}"
    else:
        where = f"{device.device_kind} ({device.platform}) x{jax.device_count()}"
    return f"{where}; jax {jax.__version__}"
