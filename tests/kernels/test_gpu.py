"""The kernel checks at real sizes in bf16 on a GPU; skipped when none is present.

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
from tests.oracle import random_qkv, three_documents

HAS_GPU = any(d.platform in ("gpu", "cuda") for d in jax.devices()) if jax.devices() else False
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")

BACKENDS = ["gpu_portable", "mosaic_gpu"]
CASES = {
    "causal_gqa": ((2, 2048, 2048, 8, 2, 128), dict(causal=True)),
    "full_mqa_d64": ((2, 1024, 2048, 8, 1, 64), dict()),
    "causal_segments_window": ((1, 4096, 4096, 4, 4, 128), dict(causal=True, window=1000, segments=True)),
    "softcap_odd": ((1, 1000, 1500, 4, 2, 64), dict(causal=True, softcap=30.0)),
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
    if options.pop("segments", False):
        options["segment_ids"] = three_documents(b, q_len)
    attn = lambda q, k, v: flash_attention(q, k, v, backend=backend, return_lse=True, **options)  # noqa: E731
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


@pytest.mark.parametrize("block_kv", [64, 128])
def test_mosaic_gpu_forward_zigzag_positions(block_kv):
    """The Hopper forward with explicit positions (a ring step), GQA and segments, in bf16."""
    if not _is_hopper():
        pytest.skip("mosaic_gpu needs sm_90 (H100/H200)")
    from kernels_pallas import api
    from lca.attention.blocks import BlockSizes
    from lca.attention import inputs

    b, q_len, kv_len, h, h_kv, d = 2, 1024, 3072, 8, 2, 128
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
