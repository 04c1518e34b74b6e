"""MAC: segment attention over [persistent || retrieved memory || segment], the memory learning per segment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from flax import nnx

from lca.config import ModelConfig
from lca.memory import mac
from lca.memory import neural_memory as nm
from lca.models.mixers import MixerEnv
from lca.models.rope import apply_rope
from lca.parallel.sharding import Sharder
from tests.memory.dense import assert_gradients_reach_every_parameter

SECTION = mac.TitansMacConfig(memory_heads=2, chunk_size=3, conv_kernel=2, persistent=2, segment=4)
ENV = MixerEnv(model=ModelConfig(d_model=16, num_heads=2), attend=None, mesh=None, shard=Sharder())
CONFIG = SECTION.mac(ENV.model)


def _setup(length=11):
    params = mac.init_params(jax.random.PRNGKey(0), CONFIG)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, length, 16))
    return params, x, jnp.broadcast_to(jnp.arange(length), (2, length))


def _dense_mac(params, x, positions):
    """Segment by segment in Python; each query attends over its visible tokens gathered explicitly."""
    mem, c, nh = CONFIG.memory, CONFIG.segment, CONFIG.num_heads
    heads = lambda z: rearrange(z, "b l (h d) -> b l h d", h=nh)  # noqa: E731
    qkv = lambda z: [heads(t) for t in jnp.split(z @ params["w_qkv"], 3, -1)]  # noqa: E731
    _, pk, pv = qkv(jnp.broadcast_to(params["memory"]["persistent"], (x.shape[0], 2, 16)))
    state = nm.fresh_state(params["memory"], mem, x.shape[0])
    outs = []
    for start in range(0, x.shape[1], c):
        s, pos = x[:, start : start + c], positions[:, start : start + c]
        rq = heads(jax.nn.silu(s @ params["w_retrieve"]))
        rq = rq / jnp.linalg.norm(rq, axis=-1, keepdims=True)
        h = rearrange(nm.retrieve(state, rq, config=mem), "b c h d -> b c (h d)") @ params["memory"]["w_out"]
        q, k, v = qkv(s)
        _, hk, hv = qkv(h)
        q, k, hk = (apply_rope(t, pos, CONFIG.rope_theta) for t in (q, k, hk))
        rows = []
        for i in range(s.shape[1]):  # query i sees P, h[:i+1], s[:i+1]
            keys = jnp.concatenate([pk, hk[:, : i + 1], k[:, : i + 1]], 1)
            values = jnp.concatenate([pv, hv[:, : i + 1], v[:, : i + 1]], 1)
            probs = jax.nn.softmax(jnp.einsum("bhd,bkhd->bhk", q[:, i], keys) / jnp.sqrt(q.shape[-1]), -1)
            rows.append(jnp.einsum("bhk,bkhd->bhd", probs, values))
        y = rearrange(jnp.stack(rows, 1), "b c h d -> b c (h d)") @ params["w_out"]
        m, state = nm.memory_layer(params["memory"], state, s + y, config=mem)
        outs.append(y * jax.nn.sigmoid(m))
    return jnp.concatenate(outs, 1)


def test_mac_mask_persistent_visible_to_all_causal_within_segment():
    mask = np.asarray(mac.mac_mask(num_persistent=3, segment=4))
    assert mask.shape == (4, 3 + 4 + 4)
    assert mask[:, :3].all()  # persistent tokens: every query
    causal = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(mask[:, 3:7], causal)  # retrieved memory of token j: queries i >= j
    np.testing.assert_array_equal(mask[:, 7:], causal)  # the segment itself


def test_mac_equals_dense_oracle():
    params, x, positions = _setup()  # 11 tokens: 2 full segments and a partial one
    got = jax.jit(lambda p, x, pos: mac.mac_layer(p, x, pos, config=CONFIG))(params, x, positions)
    np.testing.assert_allclose(got, jax.jit(_dense_mac)(params, x, positions), rtol=1e-4, atol=1e-5)


def test_future_tokens_do_not_change_earlier_outputs():
    params, x, positions = _setup()
    layer = jax.jit(lambda p, x: mac.mac_layer(p, x, positions, config=CONFIG))
    y, y2 = layer(params, x), layer(params, x.at[:, 6:].set(0.0))  # mid-segment
    np.testing.assert_array_equal(y2[:, :6], y[:, :6])
    assert not np.allclose(y2[:, 6:], y[:, 6:])


def test_mac_mixer_gradients_reach_every_parameter():
    mixer = mac.MacMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    _, x, positions = _setup(length=9)
    # retrieval + attention + memory projections/gates/conv/persistent + MLP
    assert_gradients_reach_every_parameter(mixer, x, positions, 3 + 6 + 2)


@pytest.mark.parametrize("field, value", [("num_heads", 3), ("segment", 0)])
def test_bad_config_is_one_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        mac.MacConfig(memory=CONFIG.memory, **{"num_heads": 2, "segment": 4, field: value})


def test_shards_of_partial_segments_run_the_global_scan():
    from lca.memory.context_parallel import ContextSplit
    from lca.parallel import make_mesh

    params, x, positions = _setup(12)  # 6 tokens per device, segment 4: segments straddle devices
    split = ContextSplit(make_mesh(context=2, devices=jax.devices()[:2]), "context")
    run = jax.jit(lambda p, x: mac.mac_layer(p, x, positions, config=CONFIG, split=split))
    with pytest.warns(UserWarning, match=r"12 tokens over 2 devices .* not whole segments of 4 per device.* a "
                                         r"multiple of 8"):
        jaxpr = str(jax.make_jaxpr(run)(params, x))
    assert "ppermute" not in jaxpr
    np.testing.assert_allclose(run(params, x), mac.mac_layer(params, x, positions, config=CONFIG), rtol=1e-5)


@pytest.mark.parametrize("pieces", [(1,) * 11, (5, 3, 3), (4, 4, 3), (11,), (2, 1, 1, 1, 1, 5), (3, 1, 7),
                                    (1, 1, 6, 1, 1, 1)])
def test_extend_in_pieces_equals_one_call(pieces):
    """Single tokens use the segment's cached keys and streamed memory, longer pieces rerun the open segment
    and rebuild them: pieces that end inside a segment, on its boundary, or span several (segment 4, memory
    chunk 3), in any mix, give the whole sequence's outputs."""
    params, x, positions = _setup()
    want = mac.mac_layer(params, x, positions, config=CONFIG)
    cache, outs, start = mac.start_mac_cache(params, CONFIG, 2), [], 0
    for size in pieces:
        y, cache = mac.mac_extend(params, x[:, start:start + size], positions[:, start:start + size], cache,
                                  config=CONFIG)
        outs.append(y)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
    assert int(cache.count) == 11 % CONFIG.segment
    np.testing.assert_array_equal(cache.inputs[:, 11 % CONFIG.segment:], 0)


def test_extend_with_a_mismatched_batch_is_a_value_error():
    params, x, positions = _setup()
    cache = mac.start_mac_cache(params, CONFIG, 3)
    with pytest.raises(ValueError, match=r"x must be \[batch=3, t, d_model=16\].*got x \(2, 11, 16\)"):
        mac.mac_extend(params, x, positions, cache, config=CONFIG)
