"""Helpers shared by the landmark attention tests (blockwise, retrieval and the Pallas kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.oracle import random_qkv


def qkv(seed, b, q_len, kv_len, h, hk, d=8, dtype=jnp.float32):
    return random_qkv(seed, b, q_len, kv_len, h, hk, d, dtype)


def packed(seed, b, n, mean_doc=7):
    """Monotone segment ids ``[b, n]`` int32 of randomly long packed documents."""
    rng = np.random.RandomState(seed)
    return jnp.asarray(np.cumsum(rng.rand(b, n) < 1.0 / mean_doc, axis=1), jnp.int32)


def value_and_grads(fn, q, k, v, **options):
    """``(out, (dq, dk, dv))`` under a non-trivial output cotangent, in one compiled call."""

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **options), q, k, v)
        probe = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)).astype(out.dtype)
        return out, vjp(probe)

    return run(q, k, v)


def assert_close(got, want, tol):
    """Max abs error within ``tol`` times the larger of 1 and the largest ``|want|``."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.max(np.abs(got - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), err
