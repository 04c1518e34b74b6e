"""MAL: the neural memory, then sliding-window attention (with the persistent prefix) over its output."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.config import ModelConfig
from lca.memory import mal
from lca.memory import neural_memory as nm
from lca.models.mixers import MixerEnv
from lca.parallel.sharding import Sharder
from tests.memory.dense import assert_gradients_reach_every_parameter, dense_attention_branch

SECTION = mal.TitansMalConfig(memory_heads=2, chunk_size=4, conv_kernel=2, persistent=3, window=4)
ENV = MixerEnv(model=ModelConfig(d_model=16, num_heads=2), attend=None, mesh=None, shard=Sharder())
CONFIG = SECTION.mag(ENV.model)


def _setup(length=13):
    params = mal.init_params(jax.random.PRNGKey(0), CONFIG)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, length, 16))
    return params, x, jnp.broadcast_to(jnp.arange(length), (2, length))


def test_mal_equals_dense_composition():
    params, x, positions = _setup()
    memory = params["memory"]
    y, _ = nm.memory_layer(memory, nm.fresh_state(memory, CONFIG.memory, 2), x, config=CONFIG.memory)
    want = dense_attention_branch(params, y, positions, CONFIG)
    got = jax.jit(lambda p, x, pos: mal.mal_layer(p, x, pos, config=CONFIG))(params, x, positions)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_future_tokens_do_not_change_earlier_outputs():
    params, x, positions = _setup()
    layer = jax.jit(lambda p, x: mal.mal_layer(p, x, positions, config=CONFIG))
    y, y2 = layer(params, x), layer(params, x.at[:, 9:].set(0.0))
    np.testing.assert_array_equal(y2[:, :9], y[:, :9])
    assert not np.allclose(y2[:, 9:], y[:, 9:])


def test_mal_mixer_gradients_reach_every_parameter():
    mixer = mal.MalMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    _, x, positions = _setup(length=9)
    # attention + memory projections/gates/conv/persistent + memory MLP
    assert_gradients_reach_every_parameter(mixer, x, positions, 2 + 6 + 2)
