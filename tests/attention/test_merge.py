"""merge_attention: attention over disjoint key sets merges exactly through the lse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import merge_attention, reference_attention
from tests.oracle import random_qkv


@pytest.mark.parametrize("causal", [False, True])
def test_merging_two_key_halves_equals_attention_over_all_keys(causal):
    q, k, v = random_qkv(0, 2, 12, 20, 4, 2, 8)
    q_pos = jnp.arange(12, dtype=jnp.int32) + 8
    kv_pos = jnp.arange(20, dtype=jnp.int32)

    @jax.jit
    def merged(q, k, v):
        parts = [
            reference_attention(
                q, k[:, sl], v[:, sl], causal=causal, return_lse=True,
                q_positions=q_pos, kv_positions=kv_pos[sl],
            )
            for sl in (slice(0, 13), slice(13, 20))
        ]
        return merge_attention(*parts[0], *parts[1])

    out, lse = merged(q, k, v)
    want_out, want_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, want_out, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-6)

    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0])) + jnp.sum(fn(*a)[1])
    got = jax.jit(jax.grad(loss(merged), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(
        loss(lambda *a: reference_attention(*a, causal=causal, return_lse=True)), argnums=(0, 1, 2)
    ))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_merge_with_an_empty_part_is_the_other_part_and_stays_finite():
    out = jnp.ones((1, 3, 2, 4))
    lse = jnp.zeros((1, 2, 3))
    empty_out = jnp.zeros_like(out)
    empty_lse = jnp.full_like(lse, -jnp.inf)
    merged, merged_lse = merge_attention(out, lse, empty_out, empty_lse)
    np.testing.assert_array_equal(merged, out)
    np.testing.assert_array_equal(merged_lse, lse)
    both_empty = merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert np.all(both_empty[0] == 0) and np.all(np.isneginf(both_empty[1]))
    g = jax.grad(lambda o: jnp.sum(merge_attention(o, empty_lse, empty_out, empty_lse)[0]))(out)
    assert np.all(np.isfinite(g))


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lse must be"):
        merge_attention(jnp.ones((1, 3, 2, 4)), jnp.zeros((1, 3, 2)), jnp.ones((1, 3, 2, 4)), jnp.zeros((1, 3, 2)))
