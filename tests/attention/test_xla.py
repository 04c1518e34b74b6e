"""``impl="xla"`` (jax.nn.dot_product_attention) vs the oracle, bottom-right causal included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import attention, reference_attention, xla_attention
from tests.oracle import F32, cotangents, packed_segments, random_qkv, rel_err


def _out_and_grads(fn, q, k, v):
    """``out`` and the gradients of ``sum(out * w)`` (xla has no lse to weight)."""
    w_out, _ = cotangents(q)

    def run(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(w_out)

    return jax.jit(run)(q, k, v)


def _assert_matches_oracle(q, k, v, **options):
    # F32 is stricter than the former allclose(atol=rtol=1e-5), i.e. rel_err <= 1e-5.
    got, got_grads = _out_and_grads(lambda *a: xla_attention(*a, **options), q, k, v)
    want, want_grads = _out_and_grads(lambda *a: reference_attention(*a, **options), q, k, v)
    assert rel_err(got, want) <= F32, rel_err(got, want)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert rel_err(g, w) <= F32, (f"d{name}", rel_err(g, w))


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_oracle_self_attention_with_segments(causal, window):
    q, k, v = random_qkv(0, 2, 48, 48, 4, 2, 8)
    segments = np.concatenate([np.ones((2, 20)), 2 * np.ones((2, 28))], axis=1).astype(np.int32)
    _assert_matches_oracle(q, k, v, causal=causal, window=window, segment_ids=segments)


@pytest.mark.parametrize("q_len,kv_len,window", [(16, 40, None), (16, 40, 5), (40, 16, None)])
def test_xla_causal_cross_attention_is_bottom_right(q_len, kv_len, window):
    # XLA's own is_causal is top-left; lca's is bottom-right (q_len > kv_len: rows see nothing -> 0).
    q, k, v = random_qkv(1, 2, q_len, kv_len, 4, 1, 8)
    _assert_matches_oracle(q, k, v, causal=True, window=window)


def test_xla_segment_pair_and_positions():
    q, k, v = random_qkv(2, 2, 24, 24, 2, 2, 8)
    segs = packed_segments(3, 2, 24)
    # Queries of a document with no keys see nothing: 0, as in every other implementation.
    _assert_matches_oracle(q, k, v, causal=True, segment_ids=(segs, segs + 1))
    pos = jnp.arange(24, dtype=jnp.int32)[::-1]
    _assert_matches_oracle(q, k, v, causal=True, q_positions=pos, kv_positions=pos)


def test_xla_through_the_public_door_and_its_limits():
    q, k, v = random_qkv(3, 1, 16, 24, 2, 2, 8)
    np.testing.assert_allclose(attention(q, k, v, impl="xla", causal=True),
                               reference_attention(q, k, v, causal=True), atol=1e-5)
    with pytest.raises(ValueError, match="impl='xla' has no softcap"):
        attention(q, k, v, impl="xla", softcap=30.0)
    with pytest.raises(ValueError, match="impl='xla' cannot return the lse"):
        attention(q, k, v, impl="xla", return_lse=True)
