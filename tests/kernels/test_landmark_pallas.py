"""The fused landmark forward (Pallas, interpreted on CPU) against the dense grouped-softmax oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.landmark import landmark_flash_attention
from lca.attention.landmark import landmark_reference_attention


def _qkv(seed, b, q_len, kv_len, h, hk, d=8):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, q_len, h, d)), jax.random.normal(kk, (b, kv_len, hk, d)),
            jax.random.normal(kv, (b, kv_len, hk, d)))


def _value_and_grads(fn, q, k, v, **options):
    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **options), q, k, v)
        return out, vjp(jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))

    return run(q, k, v)


@pytest.mark.parametrize(
    "b,q_len,kv_len,h,hk,L,packed",
    [(1, 16, 16, 2, 1, 4, False), (2, 21, 21, 4, 2, 4, True), (1, 6, 18, 2, 2, 8, False)],
)
def test_kernel_matches_oracle_forward_and_gradients(b, q_len, kv_len, h, hk, L, packed):
    q, k, v = _qkv(q_len, b, q_len, kv_len, h, hk)
    options = dict(block_size=L)
    if packed:
        rng = np.random.RandomState(0)
        options["segment_ids"] = jnp.asarray(np.cumsum(rng.rand(b, kv_len) < 0.15, axis=1), jnp.int32)
    want, want_grads = _value_and_grads(landmark_reference_attention, q, k, v, **options)
    got, grads = _value_and_grads(landmark_flash_attention, q, k, v, block_q=8, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_kernel_errors_name_the_argument():
    q, k, v = _qkv(0, 1, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        landmark_flash_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="block_q"):
        landmark_flash_attention(q, k, v, block_size=4, block_q=0)
    with pytest.raises(ValueError, match="causal"):
        landmark_flash_attention(q, k, v, block_size=4, causal=False)
