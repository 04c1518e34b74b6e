"""The oracle itself: checked against jax.nn.dot_product_attention and an explicit loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import reference_attention
from tests.oracle import packed_segments, random_qkv


def loop_attention(q, k, v, *, causal=False, window=None, softcap=None, q_seg=None, kv_seg=None):
    """One query and one key at a time, straight from the definitions in the README."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, q_len, h, d = q.shape
    kv_len, h_kv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((b, h, q_len), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // h_kv)
            for i in range(q_len):
                p = i + kv_len - q_len
                logits, idx = [], []
                for j in range(kv_len):
                    if causal and j > p:
                        continue
                    if window is not None and abs(p - j) >= window:
                        continue
                    if q_seg is not None and q_seg[bi, i] != kv_seg[bi, j]:
                        continue
                    s = q[bi, i, hi] @ k[bi, j, kh] / np.sqrt(d)
                    if softcap is not None:
                        s = softcap * np.tanh(s / softcap)
                    logits.append(s)
                    idx.append(j)
                if not idx:
                    continue
                logits = np.array(logits)
                m = logits.max()
                w = np.exp(logits - m)
                out[bi, i, hi] = (w[:, None] * v[bi, idx, kh]).sum(0) / w.sum()
                lse[bi, hi, i] = m + np.log(w.sum())
    return out, lse


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(causal=True),
        dict(window=3),
        dict(causal=True, window=4),
        dict(softcap=2.0),
        dict(causal=True, segments=True),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "full",
)
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (5, 9)])
def test_oracle_matches_explicit_loop(options, q_len, kv_len):
    q, k, v = random_qkv(0, 2, q_len, kv_len, 4, 2, 8)
    options = dict(options)
    segs = None
    if options.pop("segments", False):
        segs = (packed_segments(1, 2, q_len, 3), packed_segments(2, 2, kv_len, 3))
    out, lse = reference_attention(q, k, v, segment_ids=segs, return_lse=True, **options)
    want_out, want_lse = loop_attention(
        q, k, v, q_seg=None if segs is None else np.asarray(segs[0]),
        kv_seg=None if segs is None else np.asarray(segs[1]), **options,
    )
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_oracle_matches_jax_dot_product_attention(causal):
    q, k, v = random_qkv(3, 2, 16, 16, 8, 2, 16)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(reference_attention(q, k, v, causal=causal), want, atol=2e-6)


def test_rows_without_visible_keys_are_zero_with_finite_gradients():
    q, k, v = random_qkv(4, 1, 6, 6, 2, 2, 8)
    q_seg = jnp.array([[0, 0, 1, 1, 5, 5]], jnp.int32)
    kv_seg = jnp.array([[0, 0, 1, 1, 2, 2]], jnp.int32)  # segment 5 has no keys
    out, lse = reference_attention(q, k, v, segment_ids=(q_seg, kv_seg), return_lse=True)
    assert np.all(np.asarray(out)[0, 4:] == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 4:]))
    grads = jax.grad(
        lambda q, k, v: jnp.sum(reference_attention(q, k, v, segment_ids=(q_seg, kv_seg)) ** 2),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[0, 4:], 0.0)


def test_bfloat16_output_dtype_and_float32_lse():
    q, k, v = random_qkv(5, 1, 8, 8, 2, 1, 8, dtype=jnp.bfloat16)
    out, lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
