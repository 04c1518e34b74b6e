"""lca.models.layers.embed_tokens: jnp.take's values, and its table gradient as a one-hot matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.models.layers import ONE_HOT_GRAD_VOCAB, embed_tokens


def _grads(lookup, table, tokens, g):
    return jax.grad(lambda t: (lookup(t, tokens).astype(jnp.float32) * g).sum())(table)


@pytest.mark.parametrize("vocab", [256, ONE_HOT_GRAD_VOCAB + 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_table_gradient_are_jnp_takes(vocab, dtype):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    table = jax.random.normal(k1, (vocab, 24), jnp.float32).astype(dtype)
    # Repeats on purpose: a row's gradient sums every token that looked it up.
    tokens = jax.random.randint(k2, (3, 50), 0, 40)
    g = jax.random.normal(k3, (3, 50, 24), jnp.float32)
    take = lambda t, x: jnp.take(t, x, axis=0)  # noqa: E731
    np.testing.assert_array_equal(np.float32(embed_tokens(table, tokens)), np.float32(take(table, tokens)))
    got, want = _grads(embed_tokens, table, tokens, g), _grads(take, table, tokens, g)
    assert got.dtype == table.dtype
    exact_f32 = _grads(take, table.astype(jnp.float32), tokens, g)
    # float32: the same sums; bf16: no worse than jnp.take's own scatter-add in bf16.
    tol = 1e-5 if dtype == jnp.float32 else 2 * float(np.abs(np.float32(want) - exact_f32).max()) + 1e-2
    np.testing.assert_allclose(np.float32(got), exact_f32, atol=tol, rtol=1e-5)
    assert float(np.abs(exact_f32[40:]).max()) == 0.0  # rows nobody looked up get nothing


def test_small_vocabulary_has_no_scatter_in_its_gradient():
    table, tokens = jnp.ones((256, 8)), jnp.zeros((2, 16), jnp.int32)
    grad = lambda lookup: jax.make_jaxpr(jax.grad(lambda t: lookup(t, tokens).sum()))(table)  # noqa: E731
    assert "scatter-add" not in str(grad(embed_tokens))
    assert "scatter-add" in str(grad(lambda t, x: jnp.take(t, x, axis=0)))  # what it replaces
    big = jnp.ones((ONE_HOT_GRAD_VOCAB + 1, 8))
    assert "scatter-add" in str(jax.make_jaxpr(jax.grad(lambda t: embed_tokens(t, tokens).sum()))(big))


def test_gradient_under_jit_and_vmap():
    table = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    tokens = jnp.array([[1, 2, 1], [3, 3, 0]])
    per_row = jax.vmap(lambda x: jax.grad(lambda t: embed_tokens(t, x).sum())(table))(tokens)
    want = jax.vmap(lambda x: jax.grad(lambda t: jnp.take(t, x, axis=0).sum())(table))(tokens)
    np.testing.assert_allclose(jax.jit(lambda: per_row)(), want, atol=1e-6)


def test_float_tokens_are_refused():
    with pytest.raises(ValueError, match="tokens must be integers, got float32 of shape \\(2,\\)"):
        embed_tokens(jnp.ones((8, 4)), jnp.zeros((2,)))
