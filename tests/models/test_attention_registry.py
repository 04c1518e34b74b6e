"""The attention registry: names -> callables with lca's signature."""

import jax
import numpy as np
import pytest

from lca.attention import reference_attention
from lca.models import attention_registry as registry


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
    got = jax.jit(lambda *a: registry.xla_attention(*a, **opts))(q, k, v)
    want = jax.jit(lambda *a: reference_attention(*a, **opts))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [k for k in ("reference", "blockwise", "pallas") if registry.is_available(k)])
def test_local_kinds_match_reference(kind):
    q, k, v = qkv(seed=1)
    opts = dict(causal=True, segment_ids=None, window=None, softcap=None, scale=None)
    attn = registry.make_attention(kind, block_q=16, block_kv=16)
    got = jax.jit(lambda *a: attn(*a, **opts))(q, k, v)
    want = jax.jit(lambda *a: reference_attention(*a, **opts))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_auto_resolves_by_context_axis():
    assert registry.resolve_kind("auto", 1) == "blockwise"
    assert registry.resolve_kind("auto", 4) == ("ring" if registry.is_available("ring") else "blockwise")
    assert registry.resolve_kind("xla", 4) == "xla"


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="attention kind must be one of"):
        registry.make_attention("flash9000")
    with pytest.raises(ValueError, match="no softcap"):
        registry.xla_attention(*qkv(), causal=True, softcap=30.0)
    if registry.is_available("ring"):
        with pytest.raises(ValueError, match="pass mesh="):
            registry.make_attention("ring")
