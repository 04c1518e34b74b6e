"""Test setup: 8 fake CPU devices, configured before JAX initialises its backend.

XLA's concurrency-optimised CPU scheduler is off: the Mosaic GPU interpret mode
runs a kernel's warpgroups as threads whose XLA computations block in barrier
callbacks, and with that scheduler a blocked computation holds intra-op pool
workers that another warpgroup's computation needs. On a 2-core machine the
Mosaic GPU kernels with 128-key blocks then hang (on 1 core, any blocks).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Each compiled CPU executable keeps memory mappings for its code. One pytest-xdist worker runs
    hundreds of tests, and without this its mappings reached the kernel's limit (vm.max_map_count,
    65,530): 17,000 after three minutes of tests/memory, and the next XLA compile died with a
    segmentation fault (in tests/models/test_titans_mixers.py, twice in full runs, never alone).
    """
    yield
    jax.clear_caches()
