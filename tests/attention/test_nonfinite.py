"""A NaN or inf in a key or value changes only the rows that can see it.

Each case puts NaN and inf into K and V at positions some queries cannot see
(the future under causal, another document, outside the window, padding keys no
query matches) and checks, for every implementation, that the outputs, lse and
gradients of those queries are finite and equal to the clean run, while the
rows that see the poison do not come out finite. A mask applied by
multiplication fails this (0 x NaN is NaN); selection passes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from lca.attention import blockwise_attention, reference_attention, ring_attention
from lca.parallel import make_mesh

B, T, H, H_KV, D = 2, 24, 4, 2, 8


def _segments(ids):
    return jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (B, T))


DOCS = [0] * 10 + [1] * 8 + [2] * 6
# name: (options, poisoned key positions, rows that cannot see any of them)
CASES = {
    "causal_future": (dict(causal=True), [13, 14, 15], np.arange(13)),
    "other_segment": (dict(segment_ids=_segments(DOCS)), [11, 12, 16], np.r_[0:10, 18:24]),
    "outside_window": (dict(window=4), [20, 21], np.arange(17)),
    # Padding: the last keys carry an id no query has, so no row sees them.
    "padding_keys": (
        dict(causal=True, segment_ids=(_segments([0] * T), _segments([0] * 19 + [-1] * 5))),
        [19, 21, 23], np.arange(T),
    ),
}

IMPLS = {
    "reference": reference_attention,
    # kv_len 24 under 16-key blocks: the last key block holds padding too.
    "blockwise": functools.partial(blockwise_attention, block_q=8, block_kv=16),
    "pallas": functools.partial(flash_attention, block_q=16, block_kv=16),
    "pallas-tpu": functools.partial(flash_attention, block_q=128, block_kv=128, backend="tpu"),
}
# Interpreted kernels compile slowly: the default run covers each backend once.
SLOW = {("pallas", "other_segment"), ("pallas", "outside_window"), ("pallas-tpu", "other_segment"),
        ("pallas-tpu", "outside_window"), ("pallas-tpu", "padding_keys")}


def _inputs(poisoned):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, H_KV, D))
    v = jax.random.normal(kv, (B, T, H_KV, D))
    first, *rest = poisoned
    bad_k = k.at[:, first, 0, 1].set(jnp.nan).at[:, rest[-1], 1, 0].set(-jnp.inf)
    bad_v = v.at[:, rest[0], :, 2].set(jnp.inf).at[:, rest[-1], 0, 3].set(jnp.nan)
    return (q, k, v), (q, bad_k, bad_v)


def _runner(attention, rows):
    """Jitted ``(q, k, v) -> (out, lse, (dq, dk, dv))`` of a loss over ``rows`` only."""
    row_mask = np.zeros(T, bool)
    row_mask[rows] = True

    def loss(q, k, v):
        out, lse = attention(q, k, v, return_lse=True)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        # Selection, not indexing: no gather on sequence-sharded outputs.
        picked = jnp.where(row_mask[None, :, None, None], w * out, 0.0)
        return jnp.sum(picked) + jnp.sum(jnp.where(row_mask, lse, 0.0)), (out, lse)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(q, k, v):
        grads, (out, lse) = jax.device_get(grad(q, k, v))
        return out, lse, grads

    return run


def _check(attention, name, atol):
    options, poisoned, rows = CASES[name]
    clean, bad = _inputs(poisoned)
    run = _runner(functools.partial(attention, **options), rows)
    out, lse, (dq, dk, dv) = run(*bad)
    c_out, c_lse, (c_dq, c_dk, c_dv) = run(*clean)
    for what, got, want in (("out", out[:, rows], c_out[:, rows]),
                            ("lse", lse[..., rows], c_lse[..., rows]),
                            ("dq", dq[:, rows], c_dq[:, rows])):
        assert np.isfinite(got).all(), f"{what} of rows that cannot see the poison"
        np.testing.assert_allclose(got, want, atol=atol, rtol=atol, err_msg=what)
    seeing = np.setdiff1d(np.arange(T), rows)
    if seeing.size:
        # The poison still reaches the rows that see it: nothing is silently cleaned.
        assert not np.isfinite(out[:, seeing]).all()
    else:
        # No row sees the poisoned keys: they get no gradient and change no other one.
        for what, got, want in (("dk", dk, c_dk), ("dv", dv, c_dv)):
            assert np.isfinite(got).all(), what
            np.testing.assert_allclose(got, want, atol=atol, rtol=atol, err_msg=what)


@pytest.mark.parametrize("impl, name", [
    pytest.param(impl, name, marks=[pytest.mark.slow] if (impl, name) in SLOW else [])
    for impl in IMPLS for name in CASES
])
def test_hidden_nonfinite_keys_and_values_do_not_leak(impl, name):
    _check(IMPLS[impl], name, atol=1e-6 if impl == "reference" else 2e-5)


@pytest.mark.parametrize("impl, name", [
    ("blockwise", "causal_future"),
    pytest.param("blockwise", "padding_keys", marks=pytest.mark.slow),
    ("pallas", "causal_future"),
    pytest.param("pallas", "padding_keys", marks=pytest.mark.slow),
])
def test_ring_steps_do_not_leak(impl, name):
    """Through ring_attention on 4 fake devices: every step's local call selects too."""
    mesh = make_mesh(context=4, devices=jax.devices()[:4])
    block = 4 if impl == "blockwise" else 16
    ring = functools.partial(ring_attention, mesh=mesh, layout="contiguous", impl=impl,
                             block_q=block, block_kv=block)
    _check(ring, name, atol=2e-5)


@pytest.mark.slow
def test_mosaic_gpu_forward_does_not_leak():
    """The Hopper forward (Mosaic GPU interpret mode) gets the same operands as every kernel."""
    q, k, v = (jax.random.normal(key, (1, 128, 2, 64)) for key in jax.random.split(jax.random.PRNGKey(1), 3))
    bad_k, bad_v = k.at[:, 70, :, 3].set(jnp.nan), v.at[:, 100, :, 5].set(jnp.inf)
    attention = functools.partial(flash_attention, causal=True, block_q=64, block_kv=64,
                                  backend="mosaic_gpu", return_lse=True)
    (out, lse), (c_out, c_lse) = attention(q, bad_k, bad_v), attention(q, k, v)
    np.testing.assert_allclose(out[:, :70], c_out[:, :70], atol=1e-6)
    np.testing.assert_allclose(lse[..., :70], c_lse[..., :70], atol=1e-6)
    assert not np.isfinite(out[:, 70:]).all()
