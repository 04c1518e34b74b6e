"""The inference KV cache: a full buffer and a sliding window's ring give one call's attention, piece by piece,
dense and blockwise (``TILES``: tiles small enough that every piece here runs blockwise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import reference_attention
from lca.models.kv_cache import attend_cached, empty_kv_cache
from tests.models.streaming import assert_streams_and_generates

B, T, H, H_KV, D = 2, 13, 4, 2, 8
# attend_cached's default tiles (dense for these sizes) and tiles of 2 x 3, under which even one decoded token's
# [1, kv_len] logits exceed a tile, so the blockwise pass runs (several key blocks, some skipped).
TILES = {"dense": {}, "blockwise": {"block_q": 2, "block_kv": 3}}


def _qkv(dtype=jnp.float32):
    q, k, v = (jax.random.normal(key, (B, T, h, D), dtype)
               for key, h in zip(jax.random.split(jax.random.PRNGKey(0), 3), (H, H_KV, H_KV)))
    return q, k, v


def _in_pieces(cache, pieces, q, k, v, **options):
    outs, lses, start = [], [], 0
    for size in pieces:
        sl = slice(start, start + size)
        (out, lse), cache = attend_cached(q[:, sl], k[:, sl], v[:, sl], cache, return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
        start += size
    return jnp.concatenate(outs, 1), jnp.concatenate(lses, -1), cache


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("pieces", [(1,) * T, (4, 1, 1, 7), (7, 6), (T,), (2, 1, 9, 1)])
def test_a_ring_of_the_window_gives_one_calls_attention(window, pieces, tiles):
    """Pieces longer than the ring, shorter, and single tokens, across its wrap-around; output and lse."""
    q, k, v = _qkv()
    want, want_lse = reference_attention(q, k, v, causal=True, window=window, softcap=5.0, return_lse=True)
    cache = empty_kv_cache(B, T, H_KV, D, jnp.float32, window=window)
    assert cache.keys.shape == (B, window, H_KV, D)  # the window's slots, not max_len's
    out, lse, cache = _in_pieces(cache, pieces, q, k, v, window=window, softcap=5.0, **TILES[tiles])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert int(cache.length) == T
    # The ring holds the last `window` tokens, each in slot position mod window.
    np.testing.assert_array_equal(np.sort(np.asarray(cache.slot_positions)), np.arange(T - window, T))
    slots = np.arange(T - window, T) % window
    np.testing.assert_array_equal(cache.keys[:, slots], k[:, T - window:])


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("window", [None, 4])
def test_a_full_buffer_gives_one_calls_attention(window, tiles):
    """Into a buffer with room to spare (max_len T + 6): the slots past the fill never count."""
    q, k, v = _qkv()
    want, want_lse = reference_attention(q, k, v, causal=True, window=window, return_lse=True)
    cache = empty_kv_cache(B, T + 6, H_KV, D, jnp.float32)
    out, lse, _ = _in_pieces(cache, (5, 1, 7), q, k, v, window=window, **TILES[tiles])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_blockwise_cached_attention_has_the_oracles_gradients(window):
    """A prefill through the cache (after 4 cached tokens) differentiates as the one call does, in q, k and v."""
    q, k, v = _qkv()
    cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)

    def cached(q, k, v):
        cache = empty_kv_cache(B, T + 3, H_KV, D, jnp.float32, window=window)
        _, cache = attend_cached(q[:, :4], k[:, :4], v[:, :4], cache, window=window)
        out, _ = attend_cached(q[:, 4:], k[:, 4:], v[:, 4:], cache, window=window, **TILES["blockwise"])
        return jnp.sum(out * cotangent[:, 4:])

    def oracle(q, k, v):
        return jnp.sum(reference_attention(q, k, v, causal=True, window=window)[:, 4:] * cotangent[:, 4:])

    for got, want in zip(jax.grad(cached, (0, 1, 2))(q, k, v), jax.grad(oracle, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 256])
def test_a_long_prefill_never_holds_its_logits_over_the_buffer(window):
    """2,048 prompt tokens into a 4,096-token cache: the dense [t, slots] logits would be 64 MiB per row and
    head (128 MiB here); the blockwise pass's temporaries stay under an eighth of that."""
    t, max_len, heads, kv_heads, dim = 2048, 4096, 4, 2, 8
    q = jnp.zeros((1, t, heads, dim))
    k = v = jnp.zeros((1, t, kv_heads, dim))
    cache = empty_kv_cache(1, max_len, kv_heads, dim, jnp.float32, window=window)
    step = jax.jit(lambda q, k, v, c: attend_cached(q, k, v, c, window=window))
    temporaries = step.lower(q, k, v, cache).compile().memory_analysis().temp_size_in_bytes
    dense_logits = heads * t * (max_len if window is None else window + t) * 4
    assert temporaries < dense_logits / 8, (temporaries, dense_logits)


def test_a_window_as_long_as_max_len_keeps_the_full_buffer():
    assert empty_kv_cache(B, T, H_KV, D, jnp.float32, window=T).slot_positions is None
    assert empty_kv_cache(B, T, H_KV, D, jnp.float32, window=T + 5).keys.shape[1] == T


@pytest.mark.parametrize("tiles", TILES)
def test_a_ring_runs_past_max_len_in_bf16(tiles):
    """Generation beyond the length the cache was made for: the ring has no end (bf16 keys and values)."""
    q, k, v = _qkv(jnp.bfloat16)
    want = reference_attention(q, k, v, causal=True, window=3)
    cache = empty_kv_cache(B, 4, H_KV, D, jnp.bfloat16, window=3)  # made for 4 tokens, fed 13
    out, _, _ = _in_pieces(cache, (1, 5, 1, 6), q, k, v, window=3, **TILES[tiles])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=2e-2)


def test_a_ring_under_jit_compiles_one_decoding_step():
    q, k, v = _qkv()
    step = jax.jit(lambda q, k, v, c: attend_cached(q, k, v, c, window=3))
    cache = empty_kv_cache(B, T, H_KV, D, jnp.float32, window=3)
    outs = []
    for i in range(T):
        out, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache)
        outs.append(out)
    assert step._cache_size() == 1
    np.testing.assert_allclose(jnp.concatenate(outs, 1), reference_attention(q, k, v, causal=True, window=3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_a_ring_refuses_a_window_it_does_not_hold(window):
    q, k, v = _qkv()
    cache = empty_kv_cache(B, T, H_KV, D, jnp.float32, window=3)
    with pytest.raises(ValueError, match=rf"ring KV cache of 3 slots .* window <= 3, got window={window}"):
        attend_cached(q[:, :1], k[:, :1], v[:, :1], cache, window=window)


def test_a_full_buffer_refuses_more_tokens_than_it_holds():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"13 new tokens do not fit a KV cache of max_len=4"):
        attend_cached(q, k, v, empty_kv_cache(B, 4, H_KV, D, jnp.float32))


def test_a_local_layer_model_streams_and_generates_through_its_ring():
    """A [local(4), global] model: its local layers keep 4 slots; pieces and generate() give the forward's."""
    from lca.config import load_config
    from lca.models import make_model

    model = make_model(load_config("tiny", ["model.mixers.local.window=4"]), seed=1)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 15), 0, 200)
    positions = jnp.broadcast_to(jnp.arange(15), tokens.shape)
    caches = model.start_caches(2, 15)
    sizes = sorted({c.keys.shape[1] for c in jax.tree.leaves(caches, is_leaf=lambda c: hasattr(c, "keys"))})
    assert sizes == [4, 15]  # the local layer's ring, the global layer's full buffer
    assert_streams_and_generates(model, tokens, positions, model(tokens, positions, jnp.ones_like(tokens)),
                                 (6, 1, 1, 7), prompt=9)
