"""``lca.attention.attention(impl=...)`` routes to blockwise or the Pallas kernels."""

import jax
import numpy as np
import pytest

from lca.attention import (
    LocalImpl,
    attention,
    blockwise_backward,
    blockwise_forward,
    reference_attention,
)


def test_impls_agree_with_reference():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (1, 24, 4, 8))
    k = jax.random.normal(kk, (1, 24, 2, 8))
    v = jax.random.normal(kv, (1, 24, 2, 8))
    ref = reference_attention(q, k, v, causal=True)
    for impl in ("blockwise", "pallas"):
        out = attention(q, k, v, impl=impl, causal=True, block_q=16, block_kv=16)
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=impl)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(None, None, None, impl="flash3")


def test_step_only_impl_says_what_works():
    step_only = LocalImpl("step-only", None, blockwise_forward, blockwise_backward)
    with pytest.raises(ValueError, match="impl='step-only' is a ring/Ulysses step implementation"):
        attention(None, None, None, impl=step_only)
