"""MAG: sliding-window attention with a persistent prefix, gated by the neural memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca.attention import BlockSizes
from lca.config import AttentionConfig, ModelConfig
from lca.memory import mag
from lca.memory import neural_memory as nm
from lca.models.mixers import MixerEnv
from lca.parallel.sharding import Sharder
from tests.memory.dense import assert_gradients_reach_every_parameter, dense_attention_branch

MEMORY = nm.MemoryConfig(d_model=16, num_heads=2, chunk_size=4, conv_kernel=2, num_persistent=3)
CONFIG = mag.MagConfig(memory=MEMORY, num_heads=2, window=4)
SECTION = mag.TitansMagConfig(memory_heads=2, chunk_size=4, conv_kernel=2, persistent=3, window=4)
ENV = MixerEnv(model=ModelConfig(d_model=16, num_heads=2), attend=None, mesh=None, shard=Sharder())


def test_section_gives_the_mag_config():
    assert SECTION.mag(ENV.model) == CONFIG


def _setup(length=13, config=CONFIG):
    params = mag.init_params(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, length, 16))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    return params, x, positions


def test_mag_equals_dense_composition():
    params, x, positions = _setup()
    a = dense_attention_branch(params, x, positions, CONFIG)
    m, _ = nm.memory_layer(params["memory"], nm.fresh_state(params["memory"], MEMORY, 2), x, config=MEMORY)
    rms = lambda z: z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + 1e-6)  # noqa: E731
    want = rms(a) * params["gain_attn"] * jax.nn.sigmoid(rms(m) * params["gain_memory"])
    got = jax.jit(lambda p, x, pos: mag.mag_layer(p, x, pos, config=CONFIG))(params, x, positions)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_future_tokens_do_not_change_earlier_outputs():
    params, x, positions = _setup()
    layer = jax.jit(lambda p, x, pos: mag.mag_layer(p, x, pos, config=CONFIG))
    y = layer(params, x, positions)
    y2 = layer(params, x.at[:, 9:].set(0.0), positions)
    np.testing.assert_allclose(y2[:, :9], y[:, :9], rtol=0, atol=0)
    assert not np.allclose(y2[:, 9:], y[:, 9:])


def test_mag_mixer_gradients_reach_every_parameter():
    mixer = mag.MagMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    _, x, positions = _setup(length=9)
    # attention + memory projections/gates/conv/persistent + memory MLP
    assert_gradients_reach_every_parameter(mixer, x, positions, 4 + 6 + 2)


def test_the_attention_tiles_reach_both_attention_calls(monkeypatch):
    """model.attention's tiles tile the window and the prefix attention; the result and gradients stand."""
    model = dataclasses.replace(ENV.model, attention=AttentionConfig(block_q=4, block_kv=3, block_q_bwd=5,
                                                                     block_kv_bwd=2))
    tiled = SECTION.mag(model)
    assert tiled.blocks == BlockSizes(4, 3, 5, 2)
    seen, real = [], mag.attention

    def spy(*args, **options):
        seen.append({name: options.get(name) for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")})
        return real(*args, **options)

    monkeypatch.setattr(mag, "attention", spy)
    params, x, positions = _setup()
    loss = lambda config: lambda p: jnp.sum(jnp.sin(mag.mag_layer(p, x, positions, config=config)))  # noqa: E731
    got, got_grads = jax.value_and_grad(loss(tiled))(params)
    assert seen == [dict(block_q=4, block_kv=3, block_q_bwd=5, block_kv_bwd=2)] * 2  # window, then prefix
    want, want_grads = jax.value_and_grad(loss(CONFIG))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got_grads, want_grads)


@pytest.mark.parametrize("field, value", [("num_heads", 3), ("window", 0)])
def test_bad_config_is_one_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CONFIG, **{field: value})
