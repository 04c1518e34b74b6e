"""The one comparison of an attention variant with the oracle ``reference_attention``.

What is compared: ``out``, ``lse`` (finite entries; the infinite ones must
match exactly) and the gradients ``dq, dk, dv`` of one loss that weights ``out``
and ``lse`` with random cotangents, so both backward paths are exercised. The
oracle runs on plain single-device copies of the inputs.

The one error metric, per compared array (:func:`rel_err`)::

    err = max |got - want| / max |want|     (over the finite entries of want)

Bounds, by what is compared (``bound`` for out/lse, ``grad_bound`` for the
gradients, by default the same):

* :data:`SEQPAR` = 2e-4: ring, Ulysses, USP, multi-process (unchanged: these
  tests used this metric already).
* :data:`F32` = 1e-5 and :data:`BF16` = 1e-2: single-device implementations in
  float32 / bfloat16 (formerly ``||got - want|| / ||want|| <= 2e-5`` and ``2e-2``).
* :data:`KERNEL_F32` = 5e-6 (gradients :data:`KERNEL_F32_GRAD` = 3e-5) and
  :data:`KERNEL_BF16` = 2e-2 (gradients :data:`KERNEL_BF16_GRAD` = 1e-1): the
  Pallas kernel grids (formerly ``assert_allclose(atol=rtol=2e-5)``, gradients
  2e-4; bf16 3e-2 and 3e-1).

Why the changed bounds are at least as strict: measured on every array of every
existing case when the three former helpers were merged into this one, the new
bound leaves no more room than the old one did, ``new_bound / new_err <=
old_bound / old_err`` (a uniform growth of today's errors that passes the new
check passes the old one too); the slow cases included. The largest errors
measured then: 9.0e-7 (F32), 5.2e-3 (BF16), 7.4e-7 (SEQPAR), 8.7e-7 and 1.5e-6
(KERNEL_F32, gradients), 3.8e-3 and 5.7e-3 (KERNEL_BF16, gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import reference_attention

SEQPAR = 2e-4
F32 = 1e-5
BF16 = 1e-2
KERNEL_F32 = 5e-6
KERNEL_F32_GRAD = 3e-5
KERNEL_BF16 = 2e-2
KERNEL_BF16_GRAD = 1e-1


# --- inputs ---------------------------------------------------------------------------


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
    """Standard normal ``q [b, q_len, h, d]``, ``k, v [b, kv_len, h_kv, d]`` (drawn in f32, then cast)."""
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


def three_documents(batch, length):
    """Segment ids ``[batch, length]`` of three packed documents of uneven length (n/3, n/4, rest)."""
    ids = jnp.concatenate([jnp.zeros((batch, length // 3)), jnp.ones((batch, length // 4)),
                           2 * jnp.ones((batch, length))], 1)
    return ids[:, :length].astype(jnp.int32)


def make_inputs(batch, length, heads, kv_heads, head_dim=8, *, seed=0, kv_length=None,
                segments=False):
    """``q, k, v`` (f32) and segment ids (or None) for the sequence-parallel tests.

    NumPy draws, not ``jax.random``: compiling threefry for every shape costs
    seconds on CPU. With ``segments``, four documents of random lengths per row,
    so boundaries fall mid-shard.
    """
    kv_length = length if kv_length is None else kv_length
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(batch, length, heads, head_dim)
    k = normal(batch, kv_length, kv_heads, head_dim)
    v = normal(batch, kv_length, kv_heads, head_dim)
    if not segments:
        return q, k, v, None
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return q, k, v, jnp.asarray(np.stack(rows), jnp.int32)


# --- the metric and the comparison --------------------------------------------------------


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|`` over the finite entries of ``want``.

    The non-finite entries (``lse = -inf`` of rows that see no key) must be the
    same in both.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg="non-finite entries differ")
    if not finite.any():
        return 0.0
    scale = max(np.abs(want[finite]).max(), 1e-6)
    return float(np.abs(got[finite] - want[finite]).max() / scale)


def outputs_and_grads(fn, q, k, v, w_out, w_lse):
    """``(out, lse, (dq, dk, dv))`` of ``fn(q, k, v) -> (out, lse)``, in one jitted program.

    The gradients are those of ``sum(out * w_out) + sum(lse * w_lse)`` (the lse
    term only where lse is finite).
    """

    def run(q, k, v):
        (out, lse), pullback = jax.vjp(fn, q, k, v)
        d_lse = jnp.where(jnp.isfinite(lse), w_lse, 0.0)
        return out, lse, pullback((w_out.astype(out.dtype), d_lse))

    return jax.jit(run)(q, k, v)


def oracle_outputs_and_grads(q, k, v, w_out, w_lse, **options):
    """The oracle's ``outputs_and_grads`` on plain single-device copies of the arrays."""
    local = lambda x: x if not hasattr(x, "shape") else jnp.asarray(np.asarray(x))  # noqa: E731
    options = {key: local(x) if not isinstance(x, tuple) else tuple(map(local, x))
               for key, x in options.items()}
    oracle = lambda q, k, v: reference_attention(q, k, v, return_lse=True, **options)  # noqa: E731
    return outputs_and_grads(oracle, local(q), local(k), local(v), w_out, w_lse)


def cotangents(q, seed: int = 7):
    """Random ``(w_out [b, q_len, h, d], w_lse [b, h, q_len])`` float32."""
    b, q_len, h, _ = q.shape
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(k1, q.shape, jnp.float32),
            jax.random.normal(k2, (b, h, q_len), jnp.float32))


def assert_matches_oracle(fn, q, k, v, *, bound: float, grad_bound: float | None = None,
                          **options):
    """``fn(q, k, v) -> (out, lse)`` equals ``reference_attention(q, k, v, **options)``.

    ``out`` keeps q's dtype, lse is float32, every gradient is finite and has its
    input's dtype, and :func:`rel_err` is at most ``bound`` for out and lse and
    ``grad_bound`` (default ``bound``) for dq, dk, dv. Returns fn's ``(out, lse, grads)``.
    """
    grad_bound = bound if grad_bound is None else grad_bound
    w_out, w_lse = cotangents(q)
    got = outputs_and_grads(fn, q, k, v, w_out, w_lse)
    want = oracle_outputs_and_grads(q, k, v, w_out, w_lse, **options)
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, want
    assert out.shape == ref_out.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32, (lse.shape, lse.dtype)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    for name, g, x, rg in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_grads):
        assert g.dtype == x.dtype, (name, g.dtype)
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} not finite"
        errors[name] = rel_err(g, rg)
    limits = {name: bound if name in ("out", "lse") else grad_bound for name in errors}
    assert all(errors[n] <= limits[n] for n in errors), (errors, limits)
    return got
