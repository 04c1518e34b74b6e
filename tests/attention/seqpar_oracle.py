"""Shared checks for the sequence-parallel variants: forward, lse and all gradients vs the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import reference_attention

RTOL = 2e-4


def make_inputs(batch, length, heads, kv_heads, head_dim=8, *, seed=0, kv_length=None,
                segments=False):
    """Deterministic ``q, k, v`` (f32) and, with ``segments``, packed ids crossing shards."""
    kv_length = length if kv_length is None else kv_length
    # numpy, not jax.random: compiling threefry for every shape costs seconds on CPU.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(batch, length, heads, head_dim)
    k = normal(batch, kv_length, kv_heads, head_dim)
    v = normal(batch, kv_length, kv_heads, head_dim)
    if not segments:
        return q, k, v, None
    # Documents of odd lengths, different per batch row, so boundaries fall mid-shard.
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return q, k, v, jnp.asarray(np.stack(rows), jnp.int32)


def _loss_and_grads(fn, q, k, v):
    """One jitted program: ``(out, lse)`` and grads of a loss touching both."""
    w_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * w_out) + jnp.sum(jnp.sin(finite)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v
    )
    return out, lse, grads


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    assert np.array_equal(finite, np.isfinite(got)), "infinities differ"
    scale = max(np.abs(want[finite]).max(), 1e-6)
    return float(np.abs(got[finite] - want[finite]).max() / scale)


def assert_matches_oracle(fn, q, k, v, **oracle_kwargs):
    """``fn(q, k, v) -> (out, lse)`` equals the oracle in out, lse, dq, dk, dv (rel <= 2e-4)."""
    got = _loss_and_grads(fn, q, k, v)
    # The oracle runs on plain single-device copies, whatever the inputs' sharding.
    local = lambda x: None if x is None else jnp.asarray(np.asarray(x))  # noqa: E731
    oracle_kwargs = {key: local(x) if hasattr(x, "shape") else x for key, x in oracle_kwargs.items()}
    want = _loss_and_grads(
        lambda q, k, v: reference_attention(q, k, v, return_lse=True, **oracle_kwargs),
        local(q), local(k), local(v),
    )
    names = ("out", "lse", "dq", "dk", "dv")
    flat_got = (got[0], got[1], *got[2])
    flat_want = (want[0], want[1], *want[2])
    errors = {n: rel_err(g, w) for n, g, w in zip(names, flat_got, flat_want)}
    assert all(e <= RTOL for e in errors.values()), errors
    return got
