"""The chunk-parallel memory update against the token-by-token oracle and the paper's limiting cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.memory import mlp
from lca.memory import sequential, update
from lca.memory.update import MemoryTokens, chunk_step

ACT = jax.nn.silu
DIM = 6
# jit once per shape: eager scans re-trace on every call
memorize_chunked = jax.jit(update.memorize_chunked, static_argnames=("chunk_size", "act"))
memorize_sequential = jax.jit(sequential.memorize_sequential, static_argnames=("chunk_size", "act"))


def _tokens(key, t, *, lr=None, momentum=None, forget=None, dim=DIM):
    ks = jax.random.split(key, 6)
    gate = lambda k, scale: scale * jax.nn.sigmoid(jax.random.normal(k, (t,)))  # noqa: E731
    return MemoryTokens(
        q=jax.random.normal(ks[0], (t, dim)),
        k=jax.random.normal(ks[1], (t, dim)) / jnp.sqrt(dim),
        v=jax.random.normal(ks[2], (t, dim)),
        lr=gate(ks[3], 0.3) if lr is None else jnp.full((t,), lr),
        momentum=gate(ks[4], 1.0) if momentum is None else jnp.full((t,), momentum),
        forget=gate(ks[5], 0.3) if forget is None else jnp.full((t,), forget),
    )


def _state(key, depth, *, momentum_scale=0.1):
    w = mlp.init_weights(key, mlp.layer_widths(DIM, depth, 2))
    s = jax.tree.map(lambda x: momentum_scale * jax.random.normal(jax.random.fold_in(key, 1), x.shape), w)
    return w, s


def _close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_chunked_equals_sequential(depth, chunk_size):
    w, s = _state(jax.random.PRNGKey(depth), depth)
    tokens = _tokens(jax.random.PRNGKey(10 + chunk_size), 16)
    n = 16 // chunk_size
    for stop in map(jnp.int32, (0, n // 2, n)):
        got = memorize_chunked(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop)
        want = memorize_sequential(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop)
        _close(got, want)


def _grad_norms(w, tokens):
    """``[t]``: each token's gradient norm at the weights ``w``, from the closed form."""
    return jnp.sqrt(mlp.grad_sq_norms(*mlp.activations_and_deltas(w, tokens.k, tokens.v, ACT)))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_clipped_chunked_equals_sequential(depth, chunk_size):
    """max_grad_norm: both paths clip each token's gradient (all layers) to the same norm."""
    w, s = _state(jax.random.PRNGKey(depth), depth)
    tokens = _tokens(jax.random.PRNGKey(20 + chunk_size), 16)
    clip = float(jnp.median(_grad_norms(w, tokens)))  # about half the tokens clipped at the start weights
    n = 16 // chunk_size
    for stop in map(jnp.int32, (0, n // 2, n)):
        got = memorize_chunked(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop, max_grad_norm=clip)
        want = memorize_sequential(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop, max_grad_norm=clip)
        _close(got, want)
    unclipped = memorize_chunked(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=jnp.int32(n))
    assert float(jnp.abs(unclipped[0] - got[0]).max()) > 1e-3  # the clip acted


def test_clipping_bounds_every_step_and_keeps_huge_targets_finite():
    """Online descent (chunk 1) without momentum or forgetting: token t moves the weights by exactly
    ``lr * min(||grad_t||, max_grad_norm)``; unclipped, targets of 1e4 overflow within 64 tokens."""
    w, _ = _state(jax.random.PRNGKey(8), 2)
    s = jax.tree.map(jnp.zeros_like, w)
    tokens = _tokens(jax.random.PRNGKey(9), 64, lr=0.5, momentum=0.9, forget=0.0)
    tokens = tokens._replace(v=1e4 * tokens.v)
    y, _ = memorize_chunked(w, s, tokens, chunk_size=1, act=ACT, stop=jnp.int32(64))
    assert not bool(jnp.isfinite(y).all())
    y, _ = memorize_chunked(w, s, tokens, chunk_size=1, act=ACT, stop=jnp.int32(64), max_grad_norm=1.0)
    assert bool(jnp.isfinite(y).all())

    plain = tokens._replace(momentum=jnp.zeros(64))
    states = [memorize_chunked(w, s, plain, chunk_size=1, act=ACT, stop=jnp.int32(t), max_grad_norm=1.0)[1][0]
              for t in range(9)]
    for before, after, t in zip(states, states[1:], range(8)):
        moved = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(after, before)))
        norm = _grad_norms(before, jax.tree.map(lambda x: x[t:t + 1], plain))[0]
        np.testing.assert_allclose(float(moved), 0.5 * min(float(norm), 1.0), rtol=1e-4)
        assert float(norm) > 1.0  # every one of these steps was clipped


@pytest.mark.parametrize("depth, max_grad_norm", [(1, None), (2, None), (2, 1.0)])
def test_chunked_gradients_equal_sequential(depth, max_grad_norm):
    w, s = _state(jax.random.PRNGKey(3), depth)
    tokens = _tokens(jax.random.PRNGKey(4), 12)
    probe = jax.random.normal(jax.random.PRNGKey(5), (12, DIM))

    def objective(memorize):
        def f(w, s, tokens):
            y, (w_end, s_end) = memorize(w, s, tokens, chunk_size=4, act=ACT, stop=3, max_grad_norm=max_grad_norm)
            return jnp.sum(y * probe) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves((w_end, s_end)))

        return jax.grad(f, argnums=(0, 1, 2))(w, s, tokens)

    _close(objective(memorize_chunked), objective(memorize_sequential), rtol=2e-4, atol=2e-5)


def test_chunk_size_one_is_online_gradient_descent():
    """Every gradient at the weights just before the token: plain online descent with momentum."""
    w, s = _state(jax.random.PRNGKey(6), 2)
    tokens = _tokens(jax.random.PRNGKey(7), 9)
    ys = []
    for t in range(9):
        g = jax.grad(mlp.loss)(w, tokens.k[t : t + 1], tokens.v[t : t + 1], ACT)
        s = jax.tree.map(lambda s_, g_: tokens.momentum[t] * s_ - tokens.lr[t] * g_, s, g)
        w = jax.tree.map(lambda w_, s_: (1 - tokens.forget[t]) * w_ + s_, w, s)
        ys.append(mlp.apply(w, tokens.q[t], ACT))
    w0, s0 = _state(jax.random.PRNGKey(6), 2)
    y, end = memorize_chunked(w0, s0, tokens, chunk_size=1, act=ACT, stop=9)
    _close((y, end), (jnp.stack(ys), (w, s)))


def test_zero_learning_rate_leaves_memory_unchanged():
    w, _ = _state(jax.random.PRNGKey(8), 2)
    s = jax.tree.map(jnp.zeros_like, w)
    tokens = _tokens(jax.random.PRNGKey(9), 8, lr=0.0, forget=0.0)
    y, (w_end, s_end) = memorize_chunked(w, s, tokens, chunk_size=4, act=ACT, stop=2)
    _close((w_end, s_end), (w, s), rtol=0, atol=0)
    _close(y, mlp.apply(w, tokens.q, ACT))
    # With momentum and forgetting at work (random S0, eta, alpha), theta = 0 still learns nothing from the
    # tokens: outputs and state do not depend on k and v, only the old state decays and moves.
    w, s = _state(jax.random.PRNGKey(10), 2)
    tokens = _tokens(jax.random.PRNGKey(11), 8, lr=0.0)
    other = tokens._replace(k=2.0 * tokens.k[::-1], v=-tokens.v)
    run = lambda toks: memorize_chunked(w, s, toks, chunk_size=4, act=ACT, stop=2)  # noqa: E731
    _close(run(other), run(tokens), rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(run(tokens)[1][0][0] - w[0]))) > 1e-3  # the state did move


def test_full_forgetting_clears_memory():
    """alpha = 1 drops M_{t-1}: with no new gradient (theta = 0) the memory is zero."""
    w, _ = _state(jax.random.PRNGKey(10), 2)
    s = jax.tree.map(jnp.zeros_like, w)
    tokens = _tokens(jax.random.PRNGKey(11), 8, lr=0.0, forget=1.0)
    y, (w_end, _) = memorize_chunked(w, s, tokens, chunk_size=4, act=ACT, stop=2)
    _close(w_end, jax.tree.map(jnp.zeros_like, w), rtol=0, atol=0)
    _close(y, jnp.zeros_like(y), rtol=0, atol=0)


def test_full_forgetting_without_momentum_keeps_only_the_last_token():
    w, s = _state(jax.random.PRNGKey(12), 2)
    tokens = _tokens(jax.random.PRNGKey(13), 4, momentum=0.0, forget=1.0)
    _, (w_end, _) = memorize_chunked(w, s, tokens, chunk_size=4, act=ACT, stop=1)
    g = jax.grad(mlp.loss)(w, tokens.k[3:], tokens.v[3:], ACT)
    _close(w_end, jax.tree.map(lambda g_: -tokens.lr[3] * g_, g))


def test_no_momentum_is_minibatch_descent():
    """eta = 0, alpha = 0: each chunk is one step of lr-weighted mini-batch gradient descent."""
    w, _ = _state(jax.random.PRNGKey(14), 3)
    s = jax.tree.map(jnp.zeros_like, w)
    tokens = _tokens(jax.random.PRNGKey(15), 8, momentum=0.0, forget=0.0)
    want = w
    for c in range(2):
        part = slice(4 * c, 4 * c + 4)

        def weighted(w_, part=part):
            per_token = jnp.sum((mlp.apply(w_, tokens.k[part], ACT) - tokens.v[part]) ** 2, axis=-1)
            return jnp.sum(tokens.lr[part] * per_token)

        want = jax.tree.map(lambda a, g: a - g, want, jax.grad(weighted)(want))
    _, (w_end, _) = memorize_chunked(w, s, tokens, chunk_size=4, act=ACT, stop=2)
    _close(w_end, want)


@pytest.mark.parametrize("row", [-1, 0, 2, 4])
def test_chunk_state_after_any_row(row):
    """``row`` reads the state inside the chunk: the same as running only its first row + 1 tokens."""
    w, s = _state(jax.random.PRNGKey(16), 2)
    tokens = _tokens(jax.random.PRNGKey(17), 5)
    _, got = chunk_step(w, s, tokens, ACT, row=jnp.int32(row))
    if row < 0:
        want = (w, s)
    else:
        want = chunk_step(w, s, jax.tree.map(lambda x: x[: row + 1], tokens), ACT)[1]
    _close(got, want)


RESTARTS = (0, 3, 5, 8, 13)  # the first token, mid-chunk, two in one chunk (size 4), a chunk start


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_restarts_chunked_equal_sequential_forward_and_gradients(depth, chunk_size):
    """Packed documents: flagged tokens return to the restart state, both paths alike (clipped, too)."""
    w, s = _state(jax.random.PRNGKey(depth), depth)
    start = _state(jax.random.PRNGKey(30 + depth), depth, momentum_scale=0.05)
    restart = jnp.zeros(16, bool).at[jnp.array(RESTARTS)].set(True)
    tokens = _tokens(jax.random.PRNGKey(40 + chunk_size), 16)._replace(restart=restart)
    n = 16 // chunk_size
    for stop in map(jnp.int32, (0, n // 2, n)):
        got = memorize_chunked(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop, max_grad_norm=1.0, start=start)
        want = memorize_sequential(w, s, tokens, chunk_size=chunk_size, act=ACT, stop=stop, max_grad_norm=1.0,
                                   start=start)
        _close(got, want)
    plain = memorize_chunked(w, s, tokens._replace(restart=None), chunk_size=chunk_size, act=ACT, stop=jnp.int32(n))
    assert float(jnp.abs(plain[0] - got[0]).max()) > 1e-3  # the restarts acted

    probe = jax.random.normal(jax.random.PRNGKey(5), (16, DIM))

    def objective(memorize):
        def f(w, s, start, floats):  # the gradient of every input but the flags
            y, end = memorize(w, s, floats._replace(restart=restart), chunk_size=chunk_size, act=ACT, stop=n,
                              start=start)
            return jnp.sum(y * probe) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(end))

        return jax.grad(f, argnums=(0, 1, 2, 3))(w, s, start, tokens._replace(restart=None))

    _close(objective(memorize_chunked), objective(memorize_sequential), rtol=2e-4, atol=2e-5)


def test_a_restart_forgets_everything_before_it():
    """After a restart the outputs and state do not depend on the chunk-start state or on earlier tokens."""
    w, s = _state(jax.random.PRNGKey(1), 2)
    start = _state(jax.random.PRNGKey(2), 2)
    tokens = _tokens(jax.random.PRNGKey(3), 8)._replace(restart=jnp.zeros(8, bool).at[5].set(True))
    other = tokens._replace(k=tokens.k.at[:5].multiply(-2.0), v=tokens.v.at[:5].add(1.0))
    w2, s2 = _state(jax.random.PRNGKey(4), 2)
    y, end = memorize_chunked(w, s, tokens, chunk_size=8, act=ACT, stop=1, start=start)
    y2, end2 = memorize_chunked(w2, s2, other, chunk_size=8, act=ACT, stop=1, start=start)
    _close((y[5:], end), (y2[5:], end2), rtol=0, atol=1e-6)
