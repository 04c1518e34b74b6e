"""Ring and Ulysses attention as a multi-controller program: 2 processes x 4 CPU devices.

This is what a TPU pod slice or a multi-node GPU job runs: every process owns
some devices and only the shards on them. The result must equal the same
computation in one process with 8 devices, which the attention tests check
against the dense oracle; to keep this test's time down it compares to the
oracle directly (float32, relative error <= 2e-4).
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.parallel.multihost_case import oracle_case

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port),
             str(out_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S  # one budget for both workers
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        logs = [f"timed out after {TIMEOUT_S} s"] * 2
    finally:
        for p in procs:  # never leave a worker behind (one may wait forever for its peer)
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(i, p.returncode, log[-3000:]) for i, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, failed


def test_two_processes_match_one_process(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    _run_workers(tmp_path)
    got = np.load(tmp_path / "multihost.npz")
    for name, want in oracle_case().items():
        want = np.asarray(want)
        err = np.abs(got[name] - want).max() / np.abs(want).max()
        assert err <= 2e-4, (name, err)
