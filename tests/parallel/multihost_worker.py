"""One process of the multi-controller test: 4 CPU devices of a 2-process, 8-device mesh.

Usage: python multihost_worker.py PROCESS_ID PORT OUT_DIR
Runs ring (forward, lse, gradients) and Ulysses (forward, lse) attention on
global arrays built from per-process shards; process 0 saves the gathered
results to OUT_DIR/multihost.npz.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multihost_case import run_case  # noqa: E402


def main():
    process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()

    def to_global(x, mesh):
        # Each process supplies only the shards its own devices hold.
        sharding = NamedSharding(mesh, P(None, "context"))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    results = run_case(to_global)
    gathered = {name: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                for name, x in results.items()}
    if process_id == 0:
        np.savez(os.path.join(out_dir, "multihost.npz"), **gathered)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
