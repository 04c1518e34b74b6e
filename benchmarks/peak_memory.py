"""Peak extra memory of one compiled call, measured in the calling (fresh) process.

CPU: the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) is
reset to the current RSS through ``/proc/self/clear_refs`` after compilation,
so the peak counts the execution alone. glibc's mmap threshold is pinned by
the parent (``MALLOC_MMAP_THRESHOLD_``) so large buffers are returned to the OS
when freed and memory freed by compilation is not silently reused.
GPU: ``memory_stats()['peak_bytes_in_use']`` minus bytes in use before.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
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


def memory_point(compiled, *args) -> dict:
    """A sweep's memory fields for one compiled call: ``peak_bytes`` and ``seconds_alone`` of one execution
    (:func:`measure`), and ``xla_temp_bytes``, XLA's temporaries of ``compiled`` (exact, noise-free)."""
    peak, seconds = measure(compiled, *args)
    return {"peak_bytes": peak, "seconds_alone": seconds,
            "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def attach_seconds(points: list[dict], timed, keys: tuple[str, ...]) -> list[dict]:
    """Set ``seconds`` on the point of ``points`` that matches each timed row on ``keys``.

    ``timed``: what :func:`run_fresh` read back from a timing point, a list of rows or one error dict.
    Returns the rows, errors included (those set nothing), for the caller to print.
    """
    rows = [timed] if isinstance(timed, dict) else timed
    for row in rows:
        if "error" not in row:
            next(p for p in points if all(p[key] == row[key] for key in keys))["seconds"] = row["seconds"]
    return rows


def env() -> dict:
    return {**os.environ, **SUBPROCESS_ENV}


def run_fresh(script: str, point: str, timeout: float, label: dict, *, timing_only: bool = False) -> dict:
    """Run ``script --point POINT`` in a fresh process (with :func:`env`); parse the JSON of its last line.

    ``lca`` is importable there (the repository root joins ``PYTHONPATH``). A timeout or a failure
    comes back as ``{**label, "error": ...}``, so a sweep goes on past a point that does not fit.
    ``timing_only``: without :data:`SUBPROCESS_ENV`'s malloc settings, which make VmHWM exact but map and
    unmap every large buffer, slowing calls that allocate (a point that measures no memory needs neither).
    """
    environment = dict(os.environ) if timing_only else env()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(script), "--point", point]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {**label, "error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**label, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def point_or_rewrite(args, write_results, points: dict) -> bool:
    """A sweep's two modes that sweep nothing, from :func:`sweep_parser`'s arguments; True if it ran one.

    ``--from-json``: ``write_results(**saved, out_dir=args.out)``. ``--point KIND,FIELD,...``: print the JSON
    of ``points[KIND](*FIELDS)`` (fields as strings), the one measurement :func:`run_fresh` reads back.
    """
    if args.from_json:
        with open(args.from_json) as f:
            write_results(**json.load(f), out_dir=args.out)
        return True
    if args.point:
        kind, *fields = args.point.split(",")
        print(json.dumps(points[kind](*fields)))
        return True
    return False


def sweep_parser(doc: str, *, timeout: int, out: str) -> argparse.ArgumentParser:
    """A sweep script's command line: ``--timeout`` per :func:`run_fresh` point, ``--out``, ``--from-json``
    (rewrite the results from a saved ``.json``, measuring nothing) and the hidden ``--point`` it runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=timeout, help="seconds per subprocess")
    parser.add_argument("--out", default=out)
    parser.add_argument("--from-json", help="rewrite the .md and .png from this results .json; measure nothing")
    return parser
