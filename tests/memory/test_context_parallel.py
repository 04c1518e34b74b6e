"""The pipelined context-parallel memory equals the single-device memory, exactly up to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.memory import neural_memory as nm
from lca.memory.context_parallel import ContextSplit, context_parallel_memory, fresh_memory, idle_fraction
from lca.parallel import make_mesh

# 3 persistent tokens and chunk 4: the chunk grid does not align with the shards
CONFIG = nm.MemoryConfig(d_model=8, num_heads=2, depth=2, chunk_size=4, conv_kernel=3, num_persistent=3)


def _single(params, x):
    return nm.memory_layer(params, nm.fresh_state(params, CONFIG, x.shape[0]), x, config=CONFIG)[0]


@pytest.mark.parametrize("devices, micro_batches", [(2, 1), (4, 2), (8, 4)])
def test_context_parallel_equals_single_device(devices, micro_batches):
    params = nm.init_params(jax.random.PRNGKey(0), CONFIG)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6 * devices, 8))
    mesh = make_mesh(context=devices, devices=jax.devices()[:devices])
    got = jax.jit(lambda p, x: context_parallel_memory(p, x, config=CONFIG, mesh=mesh, micro_batches=micro_batches))(
        params, x
    )
    np.testing.assert_allclose(got, _single(params, x), rtol=1e-4, atol=1e-5)


def test_packed_inputs_already_split_on_an_explicit_mesh_equal_single_device():
    """Under ``jax.set_mesh`` of an explicit mesh with x and segment ids already sharded as the pipeline
    splits them (a Colab user's layout): the restarts are found across the shard boundaries."""
    params = nm.init_params(jax.random.PRNGKey(0), CONFIG)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
    segment_ids = jnp.repeat(jnp.array([[1] * 5 + [2] * 6 + [3] * 5]), 2, axis=0)  # starts at 5 and 11
    want = fresh_memory(params, x, config=CONFIG, segment_ids=segment_ids)
    mesh = make_mesh(data=2, context=4)
    split = ContextSplit(mesh, "context", batch_axes=("data",))
    with jax.set_mesh(mesh):
        put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.P("data", "context")))  # noqa: E731
        got = jax.jit(lambda p, x, s: fresh_memory(p, x, config=CONFIG, split=split, segment_ids=s))(
            params, put(x), put(segment_ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_idle_fraction_of_the_schedule():
    assert idle_fraction(1, 1) == 0.0
    assert idle_fraction(8, 1) == 7 / 8
    assert idle_fraction(4, 12) == 3 / 15


def test_bad_inputs_are_value_errors():
    params = nm.init_params(jax.random.PRNGKey(0), CONFIG)
    mesh = make_mesh(context=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="divisible by the 4 devices"):
        context_parallel_memory(params, jnp.zeros((2, 10, 8)), config=CONFIG, mesh=mesh)
    with pytest.raises(ValueError, match="micro_batches=3"):
        context_parallel_memory(params, jnp.zeros((2, 8, 8)), config=CONFIG, mesh=mesh, micro_batches=3)
    with pytest.raises(ValueError, match="'seq'"):
        context_parallel_memory(params, jnp.zeros((2, 8, 8)), config=CONFIG, mesh=mesh, axis_name="seq")
