"""Ring and Ulysses attention as a multi-controller program: 2 processes x 4 CPU devices.

This is what a TPU pod slice or a multi-node GPU job runs: every process owns
some devices and only the shards on them. The result must equal the same
computation in one process with 8 devices (the same program on the same
shards, so up to the summation order of the collectives), and both must equal
the dense oracle (float32, relative error <= 2e-4).
"""

import os
import socket
import sys
import warnings

import jax
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from tests.oracle import SEQPAR, rel_err
from tests.processes import start_logged, wait_all
from tests.parallel.multihost_case import oracle_case, run_case

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300
SAME_PROGRAM_RTOL = 1e-6  # 2 x 4 vs 1 x 8 devices: only the collectives' reduction order may differ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers_once(out_dir):
    """Both workers on a fresh port: ``[(process id, return code, log tail)]`` of those that failed."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [
        start_logged([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port), str(out_dir)],
                     merge_stdout=True, env=env)
        for i in range(2)
    ]
    logs = wait_all(procs, TIMEOUT_S)  # one budget for both workers; none is left behind
    return [(i, p.returncode, log[-3000:]) for i, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]


def _run_workers(out_dir):
    failed = _run_workers_once(out_dir)
    # Once in many CI runs on 2 loaded cores, a gloo worker was killed by SIGABRT inside XLA right after
    # connecting, and the rerun passed. A worker killed by a signal (not a failed assertion or exception,
    # which exit 1) is run again once, with a warning that keeps the first log; a second failure fails.
    if failed and all(code < 0 for _, code, _ in failed):
        warnings.warn(f"multihost workers killed by a signal, running them again: {failed}")
        failed = _run_workers_once(out_dir)
    assert not failed, failed


def _one_process_case():
    """The workers' computation in this process, on its 8 devices, sharded the same way."""
    to_global = lambda x, mesh: jax.device_put(x, NamedSharding(mesh, P(None, "context")))  # noqa: E731
    return {name: np.asarray(x) for name, x in run_case(to_global).items()}


def test_two_processes_match_one_process(tmp_path):
    if jax.device_count() != 8:
        pytest.skip("needs exactly the 8 fake CPU devices of tests/conftest.py")
    _run_workers(tmp_path)
    multi = np.load(tmp_path / "multihost.npz")
    single = _one_process_case()
    oracle = {name: np.asarray(x) for name, x in oracle_case().items()}
    assert set(multi.files) == set(single) == set(oracle)
    for name in single:
        assert multi[name].shape == single[name].shape, (name, multi[name].shape)
        assert rel_err(multi[name], single[name]) <= SAME_PROGRAM_RTOL, (name, "vs 1 process")
        assert rel_err(multi[name], oracle[name]) <= SEQPAR, (name, "vs oracle")
