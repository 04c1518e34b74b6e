"""The streaming memory layer: oracle agreement, carried state, causality, memorisation, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.memory import neural_memory as nm
from lca.memory.sequential import memorize_sequential

CONFIG = nm.MemoryConfig(d_model=16, num_heads=2, depth=2, chunk_size=4, conv_kernel=3, num_persistent=2)


def _setup(config=CONFIG, batch=2, length=11, seed=0):
    params = nm.init_params(jax.random.PRNGKey(seed), config)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, length, config.d_model))
    return params, x


def _close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@functools.partial(jax.jit, static_argnames=("config", "memorize"))
def _run(params, x, config=CONFIG, memorize=None):
    memorize = memorize or nm.memorize_chunked
    state = nm.fresh_state(params, config, x.shape[0])
    return nm.memory_layer(params, state, x, config=config, memorize=memorize)


@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, depth=1, conv_kernel=0, num_persistent=0)])
def test_layer_equals_sequential_oracle_forward_and_gradients(config):
    params, x = _setup(config)
    probe = jax.random.normal(jax.random.PRNGKey(7), (2, 11, config.d_model))

    def loss(params, x, memorize):
        y, state = _run(params, x, config, memorize)
        return jnp.sum(y * probe) + sum(jnp.sum(jnp.tanh(w)) for w in state.weights)

    _close(_run(params, x, config), _run(params, x, config, memorize_sequential))
    got = jax.grad(loss, argnums=(0, 1))(params, x, None)
    want = jax.grad(loss, argnums=(0, 1))(params, x, memorize_sequential)
    _close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("cuts", [(4, 8), (1, 2, 9), (6,)])
def test_streaming_in_pieces_equals_one_call(cuts):
    params, x = _setup()
    y_all, state_all = _run(params, x)
    step = jax.jit(functools.partial(nm.memory_layer, config=CONFIG))
    state = nm.fresh_state(params, CONFIG, 2)
    ys = []
    for piece in jnp.split(x, cuts, axis=1):
        y, state = step(params, state, piece)
        ys.append(y)
    _close(jnp.concatenate(ys, axis=1), y_all)
    _close(state, state_all)


def test_future_tokens_do_not_change_earlier_outputs():
    params, x = _setup(length=12)
    y, _ = _run(params, x)
    x2 = x.at[:, 7:].add(jax.random.normal(jax.random.PRNGKey(3), x[:, 7:].shape))
    y2, _ = _run(params, x2)
    _close(y2[:, :7], y[:, :7], rtol=0, atol=0)
    assert not np.allclose(y2[:, 7:], y[:, 7:])


@pytest.mark.parametrize("max_grad_norm", [None, nm.MAX_GRAD_NORM])
def test_memorises_random_pairs_at_test_time(max_grad_norm):
    """Fixed random projections: after streaming, M* maps the seen keys closer to their values, with the
    paper's rule (no clipping) and with the default clipping."""
    config = dataclasses.replace(CONFIG, num_persistent=0, conv_kernel=0, max_lr=0.3, max_grad_norm=max_grad_norm)
    params, x = _setup(config, batch=1, length=16, seed=4)
    h = config.num_heads
    # theta = max_lr / 2 (a larger mini-batch step diverges), little momentum, no forgetting
    params["b_gates"] = jnp.concatenate([jnp.zeros(h), jnp.full(h, -4.0), jnp.full(h, -9.0)])
    params["w_gates"] = jnp.zeros_like(params["w_gates"])
    state = nm.init_state(params, config, 1)
    tokens, _ = nm.project(params, config, state.conv_tail, x)
    keys = tokens.k.transpose(0, 2, 1, 3)  # [b, l, h, d]
    values = tokens.v.transpose(0, 2, 1, 3)

    @jax.jit
    def error(state):
        return jnp.mean(jnp.sum((nm.retrieve(state, keys, config=config) - values) ** 2, -1))

    before = error(state)
    _, state = jax.jit(functools.partial(nm.memory_layer, config=config))(params, state, x)
    after = error(state)
    assert after < 0.75 * before, (before, after)


def test_retrieve_reads_the_open_chunk():
    """After a partial chunk, retrieval sees the pending tokens' updates too."""
    params, x = _setup(length=6)
    _, full = _run(params, x)  # 2 persistent + 6 tokens: 2 pending in a chunk of 4
    assert int(full.count) == 0
    _, partial = _run(params, x[:, :5])
    assert int(partial.count) == 3
    q = jax.random.normal(jax.random.PRNGKey(9), (2, 3, CONFIG.num_heads, CONFIG.dim))
    def read_chunk_start(state):
        return jax.vmap(jax.vmap(lambda w, q: nm.mlp.apply(w, q, CONFIG.act), (0, 1), 1))(state.weights, q)

    retrieve = jax.jit(functools.partial(nm.retrieve, config=CONFIG))
    assert not np.allclose(retrieve(partial, q), read_chunk_start(partial), atol=1e-4)
    _close(retrieve(full, q), read_chunk_start(full))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("chunk_size", 0, "chunk_size"),
        ("depth", 0, "depth"),
        ("expansion", True, "expansion must be a positive int, got True"),
        ("num_persistent", -2, "num_persistent must be an int >= 0"),
        ("head_dim", 0, "head_dim must be a positive int or None"),
        ("num_heads", 3, "divisible"),
        ("conv_kernel", -1, "conv_kernel"),
        ("max_lr", 0.0, "max_lr"),
        ("max_grad_norm", 0.0, "max_grad_norm must be > 0 or None"),
        ("activation", "relu6", "activation"),
        ("init_forget", 0.0, "init_forget must be in"),
        ("init_forget", 1.0, "init_forget must be in"),
    ],
)
def test_bad_config_is_one_value_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **{field: value})


@pytest.mark.parametrize("init_forget", [0.05, 0.0025])
def test_forgetting_starts_at_init_forget(init_forget):
    # With the data-dependent part zeroed, every token's alpha is exactly the configured start value;
    # theta and eta keep their fixed starts (max_lr / 2, about 0.9).
    config = dataclasses.replace(CONFIG, init_forget=init_forget)
    params, x = _setup(config)
    params["w_gates"] = jnp.zeros_like(params["w_gates"])
    tokens, _ = nm.project(params, config, nm.init_state(params, config, 2).conv_tail, x)
    np.testing.assert_allclose(np.asarray(tokens.forget), init_forget, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens.lr), config.max_lr / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens.momentum), jax.nn.sigmoid(2.2), rtol=1e-5)


def test_bad_shapes_are_value_errors():
    params, x = _setup()
    state = nm.init_state(params, CONFIG, 2)
    with pytest.raises(ValueError, match="d_model=16"):
        nm.memory_layer(params, state, x[..., :8], config=CONFIG)
    with pytest.raises(ValueError, match="batch 2"):
        nm.memory_layer(params, state, x[:1], config=CONFIG)
    with pytest.raises(ValueError, match="num_heads=2"):
        nm.retrieve(state, x, config=CONFIG)
    with pytest.raises(ValueError, match=r"restarts must be \[batch, length\] = \(2, 11\)"):
        nm.memory_layer(params, state, x, config=CONFIG, restarts=jnp.zeros((2, 10), bool))
    with pytest.raises(ValueError, match="segment_ids must be"):
        nm.document_starts(jnp.ones((11,), jnp.int32))


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_default_step_keeps_a_fresh_memory_bounded(chunk_size):
    """The default max_lr on 512 tokens of N(0, 1): no blow-up (0.1 reached inf within 256 tokens at chunk 16)."""
    config = nm.MemoryConfig(d_model=64, num_heads=2, depth=2, chunk_size=chunk_size)
    params = nm.init_params(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 512, 64))
    y, state = jax.jit(lambda p, x: nm.memory_layer(p, nm.fresh_state(p, config, 2), x, config=config))(params, x)
    assert bool(jnp.isfinite(y).all()) and float(jnp.abs(y).max()) < 10.0
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state))


def test_default_forgetting_keeps_a_fresh_memory_alive():
    """At init, forgetting must not erase the memory within a few thousand tokens: at the old start
    alpha ~0.05 the weights fell to ~1e-35 after 2,048 tokens of N(0, 1) (0.95^2048), so no write survived."""
    config = nm.MemoryConfig(d_model=64, num_heads=2, depth=2, chunk_size=16)
    params = nm.init_params(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 2048, 64))
    _, state = _run(params, x, config=config)
    assert min(float(jnp.abs(w).max()) for w in state.weights) > 0.1


def test_zero_tokens_have_finite_gradients():
    # A token whose q/k projection is exactly 0 (zero input without a conv, e.g. padding) normalises to 0,
    # and must not turn the outer gradients into NaN.
    config = dataclasses.replace(CONFIG, conv_kernel=0, num_persistent=0)
    params, x = _setup(config)
    x = x.at[:, 3:6].set(0.0)
    grads = jax.grad(lambda p, x: jnp.sum(_run(p, x, config)[0] ** 2), argnums=(0, 1))(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(np.asarray(nm.l2_normalize(jnp.zeros((2, 4)))), 0.0)


SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])


def test_document_starts_flag_each_change_of_segment():
    want = [[0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]]
    np.testing.assert_array_equal(np.asarray(nm.document_starts(SEGMENTS)), np.asarray(want, bool))


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_document_starts_of_a_sequence_sharded_row_flag_no_shard_start(axis_types):
    """Jitted on rows split over 4 devices along the sequence: no false restart where a shard starts (with
    auto axes, a scatter after a concatenate put one at each on jax 0.10.2's CPU partitioner), and no
    refusal to slice the split axis (explicit axes)."""
    from lca.parallel.mesh import make_mesh

    mesh = make_mesh(context=4, data=2, axis_types=axis_types)
    segments = jnp.repeat(jnp.array([[1] * 5 + [2] * 6 + [3] * 5]), 2, axis=0)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(segments, jax.sharding.NamedSharding(mesh, jax.P("data", "context")))
        got = jax.jit(nm.document_starts)(sharded)
    want = np.zeros((2, 16), bool)
    want[:, [5, 11]] = True
    np.testing.assert_array_equal(np.asarray(got), want)


@functools.partial(jax.jit, static_argnames=("config", "memorize"))
def _run_packed(params, x, config=CONFIG, memorize=None):
    state = nm.fresh_state(params, config, x.shape[0])
    return nm.memory_layer(params, state, x, config=config, memorize=memorize or nm.memorize_chunked,
                           restarts=nm.document_starts(SEGMENTS))


def test_packed_rows_equal_sequential_oracle_forward_and_gradients():
    """Restarts mid-chunk, persistent tokens that leave an open chunk, a conv reaching over document starts."""
    params, x = _setup()
    probe = jax.random.normal(jax.random.PRNGKey(7), x.shape)

    def loss(params, x, memorize):
        y, state = _run_packed(params, x, CONFIG, memorize)
        return jnp.sum(y * probe) + sum(jnp.sum(jnp.tanh(w)) for w in state.weights)

    _close(_run_packed(params, x), _run_packed(params, x, CONFIG, memorize_sequential))
    got = jax.grad(loss, argnums=(0, 1))(params, x, None)
    want = jax.grad(loss, argnums=(0, 1))(params, x, memorize_sequential)
    _close(got, want, rtol=2e-4, atol=2e-5)


def test_packed_documents_see_only_their_own_conv_taps():
    """The conv (kernel 3) of a document's first tokens reads the fresh tail, not the document before."""
    params, x = _setup()
    y = _run_packed(params, x)[0]
    y2 = _run_packed(params, x.at[0, :3].add(1.0).at[1, :6].add(1.0))[0]
    np.testing.assert_array_equal(np.asarray(y2[0, 3:]), np.asarray(y[0, 3:]))
    np.testing.assert_array_equal(np.asarray(y2[1, 6:]), np.asarray(y[1, 6:]))


@pytest.mark.parametrize("cuts", [(4, 8), (1, 2, 9)])
def test_streaming_a_packed_row_in_pieces_equals_one_call(cuts):
    """Open-chunk restart flags and the conv tail carry a document start into the next call."""
    params, x = _setup()
    y_all, state_all = _run_packed(params, x)
    step = jax.jit(functools.partial(nm.memory_layer, config=CONFIG))
    state, ys = nm.fresh_state(params, CONFIG, 2), []
    restarts = nm.document_starts(SEGMENTS)
    for piece, flags in zip(jnp.split(x, cuts, axis=1), jnp.split(restarts, cuts, axis=1), strict=True):
        y, state = step(params, state, piece, restarts=flags)
        ys.append(y)
    _close(jnp.concatenate(ys, axis=1), y_all)
    _close(state, state_all)
