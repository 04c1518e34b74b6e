"""Fake CPU devices: try meshes, ring attention and sharded training on one machine."""

from __future__ import annotations

import operator
import os


def use_cpu_devices(count: int) -> None:
    """Make JAX run on ``count`` CPU devices (host memory and cores are shared).

    Call it before JAX starts a backend: right after ``import jax``, before the
    first array, ``jit`` or ``jax.devices()``. An explicit ``JAX_PLATFORMS``
    environment variable is respected; otherwise JAX is pointed at the CPU.

    >>> import lca.parallel
    >>> lca.parallel.use_cpu_devices(8)   # then make_mesh(data=2, context=4) has 8 devices

    Raises:
      ValueError: ``count`` is not a positive int.
      RuntimeError: JAX already started a backend with a different number of devices.
    """
    try:
        number = operator.index(count)  # ints and integer-likes such as np.int64
    except TypeError:
        number = 0
    if isinstance(count, bool) or number < 1:
        raise ValueError(f"use_cpu_devices(count): count must be a positive int, got {count!r}.")
    count = number
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # For any child process (and JAX versions that read only the flag).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # a backend is up; fine if it already has the devices asked for
        if jax.device_count() != count:
            raise RuntimeError(
                f"use_cpu_devices({count}) must run before JAX starts, but JAX has already started with "
                f"{jax.device_count()} {jax.default_backend()} device(s). Call it right after `import jax` "
                "(before any array, jit or jax.devices()), or restart the Python process / notebook kernel."
            ) from None
