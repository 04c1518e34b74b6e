"""The LMM mixer: the model's mixer signature around the functional memory layer."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.config import ModelConfig
from lca.memory import neural_memory as nm
from lca.memory.mixer import MemoryMixer, TitansLmmConfig, as_arrays
from lca.models.mixers import MixerEnv
from lca.parallel.sharding import Sharder

CONFIG = nm.MemoryConfig(d_model=16, num_heads=2, chunk_size=4, num_persistent=2)
SECTION = TitansLmmConfig(memory_heads=2, chunk_size=4, persistent=2)
ENV = MixerEnv(model=ModelConfig(d_model=16), attend=None, mesh=None, shard=Sharder())


def test_section_gives_the_memory_config():
    assert SECTION.memory(16) == CONFIG


def test_mixer_is_the_functional_layer_from_a_fresh_state():
    mixer = MemoryMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 16))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    y = nnx.jit(lambda m, x, p: m(x, p, jnp.zeros_like(p)))(mixer, x, positions)
    params = as_arrays(mixer.parameters)
    want = jax.jit(lambda p, x: nm.memory_layer(p, nm.fresh_state(p, CONFIG, 2), x, config=CONFIG)[0])(params, x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_mixer_gradients_reach_every_parameter():
    mixer = MemoryMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 7, 16))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(mixer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == 8  # w_qkv, w_out, w_gates, b_gates, conv, persistent, 2 memory layers
    for g in leaves:
        assert np.all(np.isfinite(g)) and np.any(g != 0)
