"""The kernel checks, and ``impl="cudnn"``'s, at real sizes in bf16 on a GPU; skipped when none is present.

Run on a GPU machine with ``pytest tests/kernels/test_gpu.py -m "slow or not slow"``.
``mosaic_gpu`` (the warp-specialised Mosaic GPU forward of
``kernels_pallas/gpu/hopper.py`` and the Mosaic GPU dQ and dK/dV kernels of
``kernels_pallas/gpu/hopper_bwd.py``; the portable backward at head_dim 256)
runs only on sm_90; until these tests pass on an H100/H200, ``backend="auto"``
does not pick it. ``test_bf16_real_sizes`` checks its forward and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from lca.attention import reference_attention
from tests.oracle import make_inputs, random_qkv, three_documents

HAS_GPU = any(d.platform in ("gpu", "cuda") for d in jax.devices()) if jax.devices() else False
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")

BACKENDS = ["gpu_portable", "mosaic_gpu"]
CASES = {
    "causal_gqa": ((2, 2048, 2048, 8, 2, 128), dict(causal=True)),
    "full_mqa_d64": ((2, 1024, 2048, 8, 1, 64), dict()),
    "causal_segments_window": ((1, 4096, 4096, 4, 4, 128), dict(causal=True, window=1000, segments=True)),
    "softcap_odd": ((1, 1000, 1500, 4, 2, 64), dict(causal=True, softcap=30.0)),
    # Per batch row: even rows four documents, odd rows one (blocks of other documents skipped per row);
    # mosaic_gpu's backward on its own (128, 64) tiles, which the policy allows at head_dim 64.
    "packed_rows_own_bwd_tiles": ((2, 4096, 4096, 4, 2, 64), dict(causal=True, segments="per_row")),
}


def _is_hopper():
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_real_sizes(backend, name):
    if backend == "mosaic_gpu" and not _is_hopper():
        pytest.skip("mosaic_gpu needs sm_90 (H100/H200)")
    (b, q_len, kv_len, h, h_kv, d), options = CASES[name]
    q, k, v = random_qkv(0, b, q_len, kv_len, h, h_kv, d, jnp.bfloat16)
    options = dict(options)
    segments = options.pop("segments", False)
    tiles = {}
    if segments == "per_row":
        options["segment_ids"] = make_inputs(b, q_len, 1, 1, segments=True, seed=3)[3].at[1::2].set(1)
        tiles = dict(block_q_bwd=128, block_kv_bwd=64) if backend == "mosaic_gpu" else {}
    elif segments:
        options["segment_ids"] = three_documents(b, q_len)
    attn = lambda q, k, v: flash_attention(q, k, v, backend=backend, return_lse=True,  # noqa: E731
                                           **tiles, **options)
    ref = lambda q, k, v: reference_attention(  # noqa: E731
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), return_lse=True,
        **options,
    )
    (out, lse), pull = jax.vjp(attn, q, k, v)
    (ref_out, ref_lse), ref_pull = jax.vjp(ref, q, k, v)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)
    dout = jax.random.normal(jax.random.PRNGKey(1), out.shape, jnp.bfloat16)
    dlse = jnp.zeros_like(lse)
    for name_, g, rg in zip("qkv", pull((dout, dlse)), ref_pull((dout.astype(jnp.float32), dlse))):
        g, rg = np.float32(g), np.float32(rg)
        # bf16 inputs: compare relative to the gradient's scale.
        err = np.abs(g - rg).max() / max(np.abs(rg).max(), 1e-6)
        assert err < 3e-2, f"d{name_}: relative max error {err}"


def test_landmark_kernels_as_a_ring_step_at_real_sizes():
    """The Pallas landmark kernels compiled for the GPU (never run on one before this test), through the ring's
    step on one device (``landmark_step(64, kernel="pallas")``), bf16, against the blockwise landmark attention."""
    from lca.attention import landmark_attention, landmark_step, ring_attention
    from lca.parallel import make_mesh

    q, k, v = random_qkv(0, 2, 2048, 2048, 8, 2, 128, jnp.bfloat16)
    seg = three_documents(2, 2048)
    mesh = make_mesh(context=1, devices=jax.devices()[:1])
    step = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True, segment_ids=seg,  # noqa: E731
                                          impl=landmark_step(64, kernel="pallas"), block_q=64)
    ref = lambda q, k, v: landmark_attention(*(x.astype(jnp.float32) for x in (q, k, v)),  # noqa: E731
                                             block_size=64, segment_ids=seg)
    out, pull = jax.vjp(step, q, k, v)
    ref_out, ref_pull = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2, rtol=2e-2)
    dout = jax.random.normal(jax.random.PRNGKey(1), out.shape, jnp.bfloat16)
    for name_, g, rg in zip("qkv", pull(dout), ref_pull(dout.astype(jnp.float32))):
        g, rg = np.float32(g), np.float32(rg)
        err = np.abs(g - rg).max() / max(np.abs(rg).max(), 1e-6)
        assert err < 3e-2, f"d{name_}: relative max error {err}"


# (block_kv, head_dim): a float32 output (a ring step's) takes one more SMEM tile. On the H100 on
# 2026-11-27 the kernel refused it with 128-key blocks at head_dim 128, counting P tiles that only the
# interpret mode allocates; it no longer counts them, so the default (64, 128) tiles run here too.
@pytest.mark.parametrize("block_kv, d", [(64, 128), (128, 128), (128, 64)])
def test_mosaic_gpu_forward_zigzag_positions(block_kv, d):
    """The Hopper forward with explicit positions (a ring step), GQA and segments, in bf16."""
    if not _is_hopper():
        pytest.skip("mosaic_gpu needs sm_90 (H100/H200)")
    from kernels_pallas import api
    from lca.attention.blocks import BlockSizes
    from lca.attention import inputs

    b, q_len, kv_len, h, h_kv = 2, 1024, 3072, 8, 2
    q, k, v = random_qkv(2, b, q_len, kv_len, h, h_kv, d, jnp.bfloat16)
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + 4096
    kv_pos = jnp.concatenate([jnp.arange(1024), jnp.arange(8192, 9216), jnp.arange(3500, 4524)])
    kv_pos = kv_pos.astype(jnp.int32)
    segs = three_documents(b, kv_len)
    q_seg, kv_seg = segs[:, :q_len], segs
    mask = inputs.make_mask(True, 2500)
    cfg = api.KernelConfig(mask, inputs.logit_options(d, None, 20.0),
                           BlockSizes(64, block_kv), "mosaic_gpu", False)
    out, lse = jax.jit(lambda *a: api.kernel_forward(*a, cfg=cfg))(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    ref_out, ref_lse = reference_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), causal=True, window=2500, softcap=20.0,
        return_lse=True, q_positions=q_pos, kv_positions=kv_pos, segment_ids=(q_seg, kv_seg),
    )
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)


def test_mosaic_gpu_more_than_256_key_blocks():
    """Issue 15 bug 2 on hardware: 313 key blocks of 64 (schedule rows in TMA pieces), forward and gradients."""
    if not _is_hopper():
        pytest.skip("mosaic_gpu needs sm_90 (H100/H200)")
    b, q_len, kv_len, h, h_kv, d = 1, 512, 20000, 4, 2, 128
    q, k, v = random_qkv(3, b, q_len, kv_len, h, h_kv, d, jnp.bfloat16)
    attn = lambda q, k, v: flash_attention(q, k, v, causal=True, block_kv=64, backend="mosaic_gpu",  # noqa: E731
                                           return_lse=True)
    ref = lambda q, k, v: reference_attention(  # noqa: E731
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True, return_lse=True)
    (out, lse), pull = jax.vjp(attn, q, k, v)
    (ref_out, ref_lse), ref_pull = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)
    dout = jax.random.normal(jax.random.PRNGKey(1), out.shape, jnp.bfloat16)
    for name_, g, rg in zip("qkv", pull((dout, jnp.zeros_like(lse))),
                            ref_pull((dout.astype(jnp.float32), jnp.zeros_like(lse)))):
        g, rg = np.float32(g), np.float32(rg)
        err = np.abs(g - rg).max() / max(np.abs(rg).max(), 1e-6)
        assert err < 3e-2, f"d{name_}: relative max error {err}"


# --- impl="cudnn": cuDNN's fused attention as lca's local implementation -------------------------

CUDNN_CASES = {
    "causal": ((2, 2048, 2048, 8, 8, 128), dict(causal=True)),
    "full_gqa": ((2, 1024, 1024, 8, 2, 128), dict()),
    "causal_window_mqa_d64": ((1, 2048, 2048, 8, 1, 64), dict(causal=True, window=300)),
    "causal_bottom_right_pallas": ((1, 512, 1024, 4, 2, 64), dict(causal=True)),
}


@pytest.mark.parametrize("name,with_lse,dtype", [
    *((name, with_lse, jnp.bfloat16) for name in CUDNN_CASES for with_lse in (True, False)),
    ("causal", False, jnp.float16),
])
def test_cudnn_impl_matches_oracle(name, with_lse, dtype):
    """Forward, lse and every gradient (with and without an lse cotangent: the fold) vs the oracle."""
    from lca.attention import attention
    from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, cotangents, rel_err

    (b, q_len, kv_len, h, h_kv, d), options = CUDNN_CASES[name]
    q, k, v = random_qkv(3, b, q_len, kv_len, h, h_kv, d, dtype)
    w_out, w_lse = cotangents(q)

    def run(attn):
        def loss(q, k, v):
            out, lse = attn(q, k, v)
            # Without the lse term its cotangent is a symbolic zero: cuDNN's plain backward.
            lse_term = (lse * w_lse).sum() if with_lse else 0.0
            return (out.astype(jnp.float32) * w_out).sum() + lse_term, (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    cudnn = lambda q, k, v: attention(q, k, v, impl="cudnn", return_lse=True, **options)  # noqa: E731
    hlo = jax.jit(lambda q, k, v: run(cudnn)).lower(q, k, v).as_text()
    assert ("__cudnn$fmha" in hlo) == (name != "causal_bottom_right_pallas"), name
    got = jax.jit(lambda q, k, v: run(cudnn))(q, k, v)
    want = jax.jit(lambda q, k, v: run(lambda q, k, v: reference_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), return_lse=True, **options)))(q, k, v)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert rel_err(got[0], want[0]) < KERNEL_BF16 and rel_err(got[1], want[1]) < KERNEL_BF16
    for name_, g, rg in zip("qkv", got[2], want[2]):
        assert rel_err(g, rg) < KERNEL_BF16_GRAD, f"d{name_}"


@pytest.mark.parametrize("layout", ["past", "diagonal", "bottom_right"])
def test_cudnn_step_with_positions_and_lse_cotangent(layout):
    """The step (forward, backward with dlse) on a chunk pair placed as in a ring, vs the oracle."""
    from lca.attention import cudnn, inputs
    from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, rel_err

    b, t, h, h_kv, d = 1, 1024, 8, 2, 128
    q, k, v = random_qkv(4, b, t, t, h, h_kv, d, jnp.bfloat16)
    q_pos = jnp.arange(t, dtype=jnp.int32) + {"past": 4096, "diagonal": 0, "bottom_right": 7}[layout]
    kv_pos = jnp.arange(t, dtype=jnp.int32)
    mask, logit = inputs.make_mask(True, None), inputs.logit_options(d, None, None)
    dout = jax.random.normal(jax.random.PRNGKey(5), q.shape, jnp.bfloat16)
    dlse = jax.random.normal(jax.random.PRNGKey(6), (b, h, t), jnp.float32)

    @jax.jit
    def step(q, k, v, q_pos, kv_pos):
        out, lse = cudnn.forward(q, k, v, q_pos, kv_pos, mask=mask, logit=logit)
        grads = cudnn.backward(q, k, v, q_pos, kv_pos, None, None, out.astype(q.dtype), lse, dout,
                               dlse, mask=mask, logit=logit)
        return out, lse, grads

    ref = lambda q, k, v: reference_attention(  # noqa: E731
        *(x.astype(jnp.float32) for x in (q, k, v)), causal=True, return_lse=True,
        q_positions=q_pos, kv_positions=kv_pos)
    (ref_out, ref_lse), pull = jax.vjp(ref, q, k, v)
    out, lse, grads = step(q, k, v, q_pos, kv_pos)
    assert rel_err(out, ref_out) < KERNEL_BF16 and rel_err(lse, ref_lse) < KERNEL_BF16
    for name_, g, rg in zip("qkv", grads, pull((dout.astype(jnp.float32), dlse))):
        assert rel_err(g, rg) < KERNEL_BF16_GRAD, f"d{name_}"


def test_cudnn_keeps_non_finite_keys_to_the_queries_that_see_them():
    """A NaN key in the future of a causal call reaches no earlier query (lca.attention.nonfinite)."""
    from lca.attention import attention

    q, k, v = random_qkv(7, 1, 512, 512, 4, 4, 64, jnp.bfloat16)
    v = v.at[:, 300].set(jnp.nan)
    out = attention(q, k, v, impl="cudnn", causal=True)
    assert np.isfinite(np.float32(out[:, :300])).all()
    assert np.isnan(np.float32(out[:, 300:])).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rows", ["packed", "id_comes_back"])
def test_cudnn_packed_documents_match_oracle(causal, rows):
    """Segment ids in a plain call: cuDNN's packed layout on sm_90 (exact rows), Pallas otherwise; vs the oracle."""
    if not _is_hopper():
        pytest.skip("cuDNN's packed layout needs sm_90 (H100/H200)")
    from lca.attention import attention
    from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, rel_err

    b, t, h, h_kv, d = 2, 2048, 8, 2, 128
    q, k, v = random_qkv(8, b, t, t, h, h_kv, d, jnp.bfloat16)
    lengths = [[700, 300, 1000, 48], [1, 1500, 500, 47]]  # the last run of each row is padding (id 0)
    seg = np.concatenate([np.repeat([1, 2, 3, 0], row)[None] for row in lengths]).astype(np.int32)
    if rows == "id_comes_back":
        seg[:, 1200:1300] = 1  # id 1 again after other documents: no packed call, Pallas
    seg = jnp.asarray(seg)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

    def run(attn):
        loss = lambda q, k, v: (attn(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(lambda *a: (loss(*a), attn(*a)), argnums=(0, 1, 2), has_aux=True))(q, k, v)

    cudnn = lambda q, k, v: attention(q, k, v, impl="cudnn", causal=causal, segment_ids=seg)  # noqa: E731
    hlo = jax.jit(cudnn).lower(q, k, v).as_text()
    assert ("PADDING_CAUSAL" if causal else "PADDING") in hlo
    (_, out), grads = run(cudnn)
    (_, want), want_grads = run(lambda q, k, v: reference_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), causal=causal, segment_ids=seg))
    assert rel_err(out, want) < KERNEL_BF16
    for name_, g, rg in zip("qkv", grads, want_grads):
        assert rel_err(g, rg) < KERNEL_BF16_GRAD, f"d{name_}"
