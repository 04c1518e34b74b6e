"""Shared training fixtures: a persistent compilation cache and one finished tiny run.

The cache lets the subprocess runs (kill -9, restore on 4 devices) reuse the
programs the in-process run compiled; it is set at collection time, before any
test compiles anything, and removed at the end of the session.
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from lca.config import load_config
from tests.processes import start_logged, wait_all

REPO = Path(__file__).resolve().parents[2]
_CACHE = tempfile.mkdtemp(prefix="lca-test-jit-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def tiny_config(run_dir, *overrides):
    return load_config("tiny", [f"run_dir={run_dir}", *overrides])


def launcher_env(env: dict | None = None) -> dict:
    """The environment of a launcher subprocess: this checkout, the shared compilation cache, ``env``."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": _CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        **(env or {}),
    }


def run_launcher(*args, devices: int = 8, env: dict | None = None, timeout: int = 300):
    """``python -m launch.train ARGS`` in a fresh process sharing the compilation cache."""
    full_env = launcher_env(env)
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args, f"runtime.cpu_devices={devices}"],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def start_launcher_processes(*args, processes: int = 2, devices: int = 4, env: dict | None = None):
    """``python -m launch.train ARGS`` started as one multi-controller job of ``processes`` x ``devices`` CPU devices.

    Their stderr are pipes, for tests that follow the log as it comes; read them all (or use
    :func:`run_launcher_processes`), since a full pipe stalls its process.
    """
    return _launcher_processes(args, processes, devices, env, logged=False)


def _launcher_processes(args, processes: int, devices: int, env: dict | None, *, logged: bool,
                        module: str = "launch.train"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = launcher_env(env)
    env.pop("XLA_FLAGS", None)
    distributed = ["runtime.distributed=on", f"runtime.coordinator_address=127.0.0.1:{port}",
                   f"runtime.num_processes={processes}", f"runtime.cpu_devices={devices}"]
    commands = [[sys.executable, "-m", module, *args, *distributed, f"runtime.process_id={i}"]
                for i in range(processes)]
    if logged:
        # stdout too: lca-eval prints its result there
        return [start_logged(cmd, cwd=REPO, env=env, merge_stdout=True) for cmd in commands]
    return [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for cmd in commands]


def run_launcher_processes(*args, processes: int = 2, devices: int = 4, timeout: int = 300,
                           module: str = "launch.train"):
    """``python -m launch.train ARGS`` (or ``module``, e.g. ``launch.eval``) as one multi-controller job of
    ``processes`` x ``devices`` CPU devices.

    Returns the processes' ``(returncode, log)``; kills any left when one fails or time runs out.
    """
    procs = _launcher_processes(args, processes, devices, None, logged=True, module=module)
    logs = wait_all(procs, timeout)
    return [(p.returncode, log) for p, log in zip(procs, logs)]


@pytest.fixture(scope="session")
def launcher():
    return run_launcher


@pytest.fixture(scope="session")
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The tiny config trained uninterrupted for its 8 steps (checkpoints every 2, keep 2)."""
    from lca.train import train

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_config(run_dir))
    return run_dir, result
