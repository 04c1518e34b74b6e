"""blockwise_attention against the oracle: forward, lse and all gradients over a grid."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import blockwise_attention, reference_attention
from lca.parallel import make_mesh
from tests.oracle import BF16, F32, assert_matches_oracle, packed_segments, random_qkv

# (batch, q_len, kv_len, heads, kv_heads, head_dim, block_q, block_kv)
SHAPES = {
    "mha-even": (2, 32, 32, 4, 4, 16, 8, 8),
    "gqa-odd": (1, 37, 53, 4, 2, 8, 8, 16),
    "mqa-qshort": (2, 11, 45, 4, 1, 8, 4, 8),
    "one-block": (1, 9, 9, 2, 1, 8, 64, 64),
}
OPTIONS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=6),
    "causal-window": dict(causal=True, window=9),
    "softcap": dict(causal=True, softcap=1.5, scale=0.5),
    "segments": dict(segments=True),
    "causal-segments": dict(causal=True, segments=True),
}


def _run(shape_name, option_name, dtype, bound):
    b, q_len, kv_len, h, h_kv, d, bq, bk = SHAPES[shape_name]
    q, k, v = random_qkv(hash(shape_name) % 1000, b, q_len, kv_len, h, h_kv, d, dtype)
    options = dict(OPTIONS[option_name])
    if options.pop("segments", False):
        options["segment_ids"] = (
            packed_segments(1, b, q_len, 7),
            packed_segments(1, b, kv_len, 7 * kv_len // q_len),
        )
    attention = functools.partial(blockwise_attention, block_q=bq, block_kv=bk, return_lse=True)
    assert_matches_oracle(functools.partial(attention, **options), q, k, v, bound=bound, **options)


@pytest.mark.parametrize("option_name", list(OPTIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_float32_matches_oracle(shape_name, option_name):
    _run(shape_name, option_name, jnp.float32, bound=F32)


@pytest.mark.parametrize("option_name", ["full", "causal", "causal-segments"])
@pytest.mark.parametrize("shape_name", ["gqa-odd"])
def test_bfloat16_matches_oracle(shape_name, option_name):
    # bf16 inputs, f32 accumulation; probabilities are rounded to bf16 for the
    # p @ v products (as FlashAttention does), hence the looser tolerance.
    _run(shape_name, option_name, jnp.bfloat16, bound=BF16)


def test_masked_key_blocks_are_skipped_not_computed():
    """NaN in the last key block: query blocks that cannot see it must stay finite.

    Had the block been computed and masked, ``0 * NaN`` would poison them.
    """
    q, k, v = random_qkv(0, 1, 32, 32, 2, 2, 8)
    v = v.at[:, 24:].set(jnp.nan)
    attention = functools.partial(blockwise_attention, causal=True, block_q=8, block_kv=8)
    out = attention(q, k, v)
    assert np.all(np.isfinite(out[:, :24])) and np.all(np.isnan(out[:, 24:]))
    dq = jax.grad(lambda q: jnp.sum(attention(q, k, v)[:, :24]))(q)
    assert np.all(np.isfinite(dq[:, :24]))
    windowed = blockwise_attention(q, k, v.at[:, :8].set(jnp.nan).at[:, 24:].set(0.0), window=4, block_q=8, block_kv=8)
    # Query block [16, 24) is >= 9 positions past key block [0, 8): skipped for W=4.
    assert np.all(np.isfinite(windowed[:, 16:]))


def test_key_blocks_of_other_documents_are_skipped_not_computed():
    """Packed rows: a key block whose segment ids no query of a block shares is never computed.

    Row 0 holds documents [0, 12), [12, 20), [20, 32); row 1 [0, 16), [16, 32).
    Key block [8, 16) meets no document of query block [24, 32) in either row, so
    NaN there must not reach those queries (it reaches the others, which see it).
    """
    q, k, v = random_qkv(1, 2, 32, 32, 2, 1, 8)
    seg = np.zeros((2, 32), np.int32)
    seg[0, 12:], seg[0, 20:], seg[1, 16:] = 1, 2, 1
    seg = jnp.asarray(seg)
    v = v.at[:, 8:16].set(jnp.nan)
    attention = functools.partial(blockwise_attention, segment_ids=seg, block_q=8, block_kv=8)
    for options in (dict(), dict(causal=True)):
        out = attention(q, k, v, **options)
        assert np.all(np.isfinite(out[:, 24:])), options
        assert np.all(np.isnan(out[:, 8:16])), options
        dq = jax.grad(lambda q: jnp.sum(attention(q, k, v, **options)[:, 24:]))(q)
        assert np.all(np.isfinite(dq[:, 24:])), options
    # One batch row whose documents do meet is enough to compute the block; the
    # other row's queries still get nothing from its keys (masks select, see
    # tests/attention/test_nonfinite.py).
    out = attention(q, k, v, segment_ids=seg.at[1].set(0))
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[0, 24:]))


def test_jit_vmap_and_grad_compose():
    q, k, v = random_qkv(1, 3, 20, 20, 2, 1, 8)
    attention = functools.partial(blockwise_attention, causal=True, block_q=8, block_kv=8)
    per_example = jax.jit(jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None])[0]))
    np.testing.assert_allclose(per_example(q, k, v), reference_attention(q, k, v, causal=True), atol=1e-6)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None]))(q, k, v))))
    want = jax.grad(lambda q: jnp.sum(reference_attention(q, k, v, causal=True)))(q)
    np.testing.assert_allclose(grad(q), want, atol=1e-5)


def test_inside_shard_map_over_batch_and_heads():
    mesh = make_mesh(data=2, tensor=4)
    q, k, v = random_qkv(2, 4, 24, 24, 8, 4, 8)
    spec = jax.P("data", None, "tensor", None)
    sharded = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in (q, k, v)]

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    def local(q, k, v):
        return blockwise_attention(q, k, v, causal=True, block_q=8, block_kv=8)

    np.testing.assert_allclose(local(*sharded), reference_attention(q, k, v, causal=True), atol=1e-6)
    with jax.set_mesh(mesh):  # explicit-axis arrays: eager ops outside jit need the mesh
        grads = jax.grad(lambda *a: jnp.sum(local(*a) ** 2), argnums=(0, 1, 2))(*sharded)
    want = jax.grad(lambda *a: jnp.sum(reference_attention(*a, causal=True) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_explicit_positions_place_a_key_chunk_elsewhere():
    q, k, v = random_qkv(3, 1, 16, 16, 2, 2, 8)
    q_pos = jnp.arange(16, dtype=jnp.int32) + 40
    kv_pos = jnp.arange(16, dtype=jnp.int32) * 3 + 20
    options = dict(causal=True, window=30, q_positions=q_pos, kv_positions=kv_pos)
    attention = functools.partial(blockwise_attention, block_q=4, block_kv=4, return_lse=True,
                                  **options)
    assert_matches_oracle(attention, q, k, v, bound=F32, **options)
