"""lca.parallel.use_cpu_devices: N fake CPU devices before JAX starts, a clear error after."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from lca.parallel import use_cpu_devices
from tests.fresh_env import REPO, user_env


def test_before_jax_starts_gives_that_many_devices(tmp_path):
    code = "import jax, lca.parallel; lca.parallel.use_cpu_devices(3); print(jax.default_backend(), jax.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=user_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "3"]


def test_after_jax_started_same_count_is_fine_other_count_is_a_clear_error():
    assert jax.device_count() == 8  # tests/conftest.py
    use_cpu_devices(8)
    use_cpu_devices(np.int64(8))
    with pytest.raises(RuntimeError, match=r"use_cpu_devices\(4\) must run before JAX starts.*8 cpu device"):
        use_cpu_devices(4)


@pytest.mark.parametrize("count", [0, -2, True, 2.0, "8", None])
def test_bad_count(count):
    with pytest.raises(ValueError, match="count must be a positive int"):
        use_cpu_devices(count)
