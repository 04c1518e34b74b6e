"""The fused landmark kernels (Pallas, interpreted on CPU) against the dense grouped-softmax oracle, alone and as
the step of a split sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.landmark import landmark_flash_attention
from lca.attention import attention, ring_attention, ulysses_attention
from lca.attention.landmark import landmark_forward, landmark_reference_attention, landmark_step
from lca.parallel import make_mesh
from tests.attention.landmark_checks import packed, qkv, value_and_grads


@pytest.mark.parametrize(
    "b,q_len,kv_len,h,hk,L,segmented",
    [(1, 16, 16, 2, 1, 4, False), (2, 21, 21, 4, 2, 4, True), (1, 6, 18, 2, 2, 8, False)],
)
def test_kernel_matches_oracle_forward_and_gradients(b, q_len, kv_len, h, hk, L, segmented):
    q, k, v = qkv(q_len, b, q_len, kv_len, h, hk)
    options = dict(block_size=L)
    if segmented:
        options["segment_ids"] = packed(0, b, kv_len)
    want, want_grads = value_and_grads(landmark_reference_attention, q, k, v, **options)
    got, grads = value_and_grads(landmark_flash_attention, q, k, v, block_q=8, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_kernel_errors_name_the_argument():
    q, k, v = qkv(0, 1, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        landmark_flash_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="block_q"):
        landmark_flash_attention(q, k, v, block_size=4, block_q=0)
    with pytest.raises(ValueError, match="causal"):
        landmark_flash_attention(q, k, v, block_size=4, causal=False)


def _split(kind, n):
    mesh = make_mesh(context=n, devices=jax.devices()[:n])
    call = {"ring": ring_attention, "ulysses": ulysses_attention}[kind]
    return lambda q, k, v, **options: call(q, k, v, mesh=mesh, **options)


@pytest.mark.parametrize("kind,n,length,L", [("ring", 2, 32, 4), ("ulysses", 2, 24, 8)])
def test_the_kernels_as_a_sharded_step_match_the_oracle_with_the_lse_gradient(kind, n, length, L):
    # out and lse0 through the split sequence, differentiated, against autodiff of the blockwise forward
    q, k, v = qkv(length, 2, length, length, 4, 2)
    seg = packed(1, 2, length)
    pos = jnp.arange(length, dtype=jnp.int32)
    step = landmark_step(L, kernel="pallas")

    def dense(q, k, v):
        return landmark_forward(q, k, v, pos, pos, seg, seg, block_size=L, scale=8**-0.5)

    def split(q, k, v):
        return _split(kind, n)(q, k, v, causal=True, segment_ids=seg, impl=step, return_lse=True, block_q=8)

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(jnp.where(jnp.isfinite(lse), lse, 0.0)))

    for got, want in zip(split(q, k, v), dense(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    got = jax.jit(jax.grad(functools.partial(loss, split), (0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, dense), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_the_pallas_step_tiles_keys_one_block_at_a_time():
    q, k, v = qkv(0, 1, 16, 16, 2, 2)
    with pytest.raises(ValueError, match=r"block_kv=8: landmark_step\(kernel='pallas'\) tiles the keys one landmark "
                                         r"block at a time"):
        _split("ring", 2)(q, k, v, causal=True, impl=landmark_step(4, kernel="pallas"), block_kv=8)
    with pytest.raises(ValueError, match=r"kernel='triton' is not a landmark step kernel"):
        landmark_step(4, kernel="triton")
    np.testing.assert_allclose(attention(q, k, v, causal=True, impl=landmark_step(4, kernel="pallas")),
                               landmark_flash_attention(q, k, v, block_size=4), atol=0)
