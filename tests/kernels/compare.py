"""One comparison against the oracle: forward, lse and the gradients of q, k, v.

The loss weights ``out`` and ``lse`` with random cotangents, so the lse
cotangent path of the backward is exercised as well as the output one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import flash_attention
from lca.attention import reference_attention


def random_qkv(seed, b, q_len, kv_len, h, h_kv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, q_len, h, d), dtype),
        jax.random.normal(kk, (b, kv_len, h_kv, d), dtype),
        jax.random.normal(kv, (b, kv_len, h_kv, d), dtype),
    )


def _outputs_and_grads(attn, q, k, v, w_out, w_lse):
    """``(out, lse, (dq, dk, dv))`` of ``attn`` for the cotangents ``(w_out, w_lse)``, in one jit."""

    def run(q, k, v):
        (out, lse), pullback = jax.vjp(attn, q, k, v)
        # The lse cotangent is only meaningful where lse is finite.
        d_lse = jnp.where(jnp.isfinite(lse), w_lse, 0.0)
        return out, lse, pullback((w_out.astype(out.dtype), d_lse))

    return jax.jit(run)(q, k, v)


def check_against_reference(attn, q, k, v, *, atol=2e-5, rtol=2e-5, **options):
    """``attn(q, k, v) -> (out, lse)`` must match ``reference_attention(..., **options)``."""
    ref = lambda q, k, v: reference_attention(q, k, v, return_lse=True, **options)  # noqa: E731
    b, q_len, h, _ = q.shape
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    w_out = jax.random.normal(k1, q.shape, jnp.float32)
    w_lse = jax.random.normal(k2, (b, h, q_len), jnp.float32)
    out, lse, grads = _outputs_and_grads(attn, q, k, v, w_out, w_lse)
    ref_out, ref_lse, ref_grads = _outputs_and_grads(ref, q, k, v, w_out, w_lse)

    assert out.dtype == q.dtype and out.shape == ref_out.shape
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=atol, rtol=rtol)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.float32(g)).all(), f"d{name} has non-finite entries"
        np.testing.assert_allclose(
            np.float32(g), np.float32(rg), atol=atol * 10, rtol=rtol * 10, err_msg=f"d{name}"
        )


def packed_segments(b, n):
    # Three packed documents of uneven length per row.
    ids = jnp.concatenate([jnp.zeros((b, n // 3)), jnp.ones((b, n // 4)), 2 * jnp.ones((b, n))], 1)
    return ids[:, :n].astype(jnp.int32)


def run_flash_case(shape, options, blocks, backend, dtype=jnp.float32, atol=2e-5):
    """Run ``flash_attention`` on one case of the test grids and compare with the oracle."""
    b, q_len, kv_len, h, h_kv, d = shape
    q, k, v = random_qkv(0, b, q_len, kv_len, h, h_kv, d, dtype)
    options = dict(options)
    if options.pop("segments", False):
        segs = packed_segments(b, max(q_len, kv_len))
        options["segment_ids"] = segs[:, :q_len] if q_len == kv_len else (segs[:, :q_len], segs[:, :kv_len])
    attn = functools.partial(
        flash_attention, block_q=blocks[0], block_kv=blocks[1], backend=backend,
        return_lse=True, **options,
    )
    check_against_reference(attn, q, k, v, atol=atol, rtol=atol, **options)
