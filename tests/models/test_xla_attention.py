"""``xla_attention``: ``jax.nn.dot_product_attention`` behind lca's signature."""

import jax
import numpy as np
import pytest

from lca.attention import reference_attention
from lca.attention.xla import xla_attention


def qkv(b=2, length=48, h=4, h_kv=2, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, length, h, d)), jax.random.normal(keys[1], (b, length, h_kv, d)),
            jax.random.normal(keys[2], (b, length, h_kv, d)))


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_attention_matches_reference(causal, window):
    q, k, v = qkv()
    segments = np.concatenate([np.ones((2, 20)), 2 * np.ones((2, 28))], axis=1).astype(np.int32)
    opts = dict(causal=causal, segment_ids=segments, window=window, softcap=None, scale=None)
    got = jax.jit(lambda *a: xla_attention(*a, **opts))(q, k, v)
    want = jax.jit(lambda *a: reference_attention(*a, **opts))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_xla_has_no_softcap():
    with pytest.raises(ValueError, match="no softcap"):
        xla_attention(*qkv(), causal=True, softcap=30.0)
