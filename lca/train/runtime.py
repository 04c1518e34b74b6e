"""Process-level setup that must happen before JAX picks its devices."""

from __future__ import annotations

import logging
import os

from lca.config import ConfigError, RuntimeConfig
from lca.parallel.devices import use_cpu_devices

log = logging.getLogger("lca.train")

# Environment variables that mean "this process is one of several in a job".
_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def set_cpu_devices(count: int) -> None:
    """``runtime.cpu_devices``: run on ``count`` fake CPU devices (0: leave JAX's devices alone).

    Must be called before JAX initialises a backend; the launchers do.
    """
    if count <= 0:
        return
    try:
        use_cpu_devices(count)
    except RuntimeError:
        import jax

        raise ConfigError(
            f"runtime.cpu_devices={count} but JAX already started with {jax.device_count()} devices; "
            "set it before JAX initialises (the launchers do), or set runtime.cpu_devices=0."
        ) from None


def is_multi_process_env() -> bool:
    """A SLURM job with several tasks, a multi-host TPU slice, or an explicit coordinator."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(name in os.environ for name in _MULTI_PROCESS_HINTS)


def initialize_distributed(cfg: RuntimeConfig) -> bool:
    """``jax.distributed.initialize()`` when the run is multi-process; True if it was called."""
    if cfg.distributed == "off" or (cfg.distributed == "auto" and not is_multi_process_env()):
        return False
    import jax

    # With no arguments JAX detects SLURM, TPU pods and GKE/k8s itself.
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
    )
    log.info("process %d of %d", jax.process_index(), jax.process_count())
    return True
