"""Shared helpers for comparing an attention variant against the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import reference_attention


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def packed_segments(seed, batch, length, mean_doc=9):
    """Monotone segment ids ``[batch, length]`` int32: packed documents of random lengths."""
    rng = np.random.RandomState(seed)
    starts = rng.rand(batch, length) < 1.0 / mean_doc
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def probe_loss(attention_fn, **options):
    """A scalar of ``(out, lse)`` with a non-trivial cotangent for both, to test all gradients."""

    def loss(q, k, v):
        out, lse = attention_fn(q, k, v, return_lse=True, **options)
        out = out.astype(jnp.float32)
        weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * weights) + 0.25 * jnp.sum(finite_lse * jnp.cos(finite_lse))

    return loss


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_matches_oracle(attention_fn, q, k, v, *, rtol, **options):
    """Forward, lse and dq/dk/dv of ``attention_fn`` equal the oracle's to relative error ``rtol``."""
    # Jitted whole: op-by-op dispatch of an unjitted scan/grad costs more than it tests.
    out, lse = jax.jit(lambda *a: attention_fn(*a, return_lse=True, **options))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda *a: reference_attention(*a, return_lse=True, **options))(q, k, v)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    assert rel_err(out, ref_out) <= rtol, ("out", rel_err(out, ref_out))
    finite = np.isfinite(np.asarray(ref_lse))
    assert rel_err(np.asarray(lse)[finite], np.asarray(ref_lse)[finite]) <= rtol
    grads = jax.jit(jax.grad(probe_loss(attention_fn, **options), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(probe_loss(reference_attention, **options), argnums=(0, 1, 2)))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == rg.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"d{name} not finite"
        assert rel_err(g, rg) <= rtol, (f"d{name}", rel_err(g, rg))
