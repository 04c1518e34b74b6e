"""Cooperating subprocesses (the processes of one multi-controller JAX job), waited for without deadlock.

Each process writes its log to a temporary file, not a pipe. With pipes, a test that
reads process 0 to the end first can hang: process 1 blocks once its pipe is full
(about 64 KiB of log), while process 0 waits for process 1 at JAX's distributed
shutdown barrier.
"""

from __future__ import annotations

import subprocess
import tempfile
import time


def start_logged(cmd: list[str], *, merge_stdout: bool = False, **popen) -> subprocess.Popen:
    """``Popen(cmd)`` with stderr (and stdout if ``merge_stdout``) going to a temporary file, ``proc.log_file``."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log if merge_stdout else subprocess.DEVNULL, stderr=log, text=True, **popen)
    proc.log_file = log
    return proc


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process within one ``timeout`` budget; kill what is left; return their logs."""
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:  # a process whose peer died waits for it forever
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for p in procs:
        p.log_file.seek(0)
        logs.append((f"timed out after {timeout} s\n" if timed_out else "") + p.log_file.read())
        p.log_file.close()
    return logs
