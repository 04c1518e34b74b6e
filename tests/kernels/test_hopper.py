"""The Mosaic GPU (Hopper) forward on CPU: Mosaic GPU interpret mode vs the oracle, and CUDA lowering.

No H100/H200 backs this file. Two checks stand in for one:

* ``InterpretGPUParams`` runs the kernel's TMA copies, barriers, wgmma and
  register math on CPU, simulating SMEM: forward and lse against
  ``reference_attention`` (the gradients in these cases come from the portable
  backward, which ``mosaic_gpu`` uses);
* lowering the kernel for ``cuda`` on CPU runs the Pallas -> Mosaic GPU
  lowering (layouts, TMA shapes and alignment), without compiling to PTX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api
from lca.attention.blocks import BlockSizes
from lca.attention import inputs, reference_attention
from tests.kernels.flash_case import run_flash_case
from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, random_qkv, three_documents

# (b, q_len, kv_len, h, h_kv, d), options; blocks (64, 64): two or more key blocks each.
CASES = {
    # q_len > kv_len, bottom-right causal: the first 36 queries see no key (out 0, lse -inf).
    "causal_gqa_odd_empty_rows": ((1, 136, 100, 4, 2, 64), dict(causal=True)),
}
SLOW_CASES = {
    "mqa_segments_window_softcap": ((1, 130, 130, 2, 1, 64), dict(causal=True, window=50, segments=True, softcap=4.0)),
    "full_cross_scale": ((2, 70, 200, 2, 2, 64), dict(scale=0.2)),
    "window_only_gqa": ((1, 192, 192, 4, 2, 64), dict(window=40)),
    "segments_d128": ((1, 100, 100, 2, 1, 128), dict(segments=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_gpu_forward_matches_reference(name):
    run_flash_case(*CASES[name], (64, 64), backend="mosaic_gpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_mosaic_gpu_forward_matches_reference_more(name):
    run_flash_case(*SLOW_CASES[name], (64, 64), backend="mosaic_gpu")


@pytest.mark.slow
def test_mosaic_gpu_bf16():
    run_flash_case((1, 128, 128, 2, 1, 64), dict(causal=True), (64, 64), "mosaic_gpu",
                   jnp.bfloat16, bound=KERNEL_BF16, grad_bound=KERNEL_BF16_GRAD)


def _config(mask, d, blocks=(64, 64), softcap=None, interpret=True):
    return api.KernelConfig(mask, inputs.logit_options(d, None, softcap), BlockSizes(*blocks),
                            "mosaic_gpu", interpret)


def test_zigzag_positions_and_key_offset():
    """Ring-step use: a query chunk at a global offset, keys in three runs, segments, softcap."""
    b, q_len, kv_len, h, h_kv, d = 1, 64, 192, 2, 1, 64
    q, k, v = random_qkv(5, b, q_len, kv_len, h, h_kv, d)
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + 200
    kv_pos = jnp.concatenate([jnp.arange(64), jnp.arange(64, 128) + 1000, jnp.arange(170, 234)])
    kv_pos = kv_pos.astype(jnp.int32)  # the middle key block is in the future: never fetched
    segs = three_documents(b, 256)
    q_seg, kv_seg = segs[:, :q_len], segs[:, 40:40 + kv_len]
    mask = inputs.make_mask(True, 150)
    out, lse = jax.jit(lambda *a: api.kernel_forward(*a, cfg=_config(mask, d, softcap=5.0)))(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    ref_out, ref_lse = reference_attention(
        q, k, v, causal=True, window=150, softcap=5.0, return_lse=True, q_positions=q_pos,
        kv_positions=kv_pos, segment_ids=(q_seg, kv_seg),
    )
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-5)


@pytest.mark.parametrize(
    "shape, blocks, causal, window, softcap, segmented",
    [
        ((1, 256, 256, 4, 2, 64), (64, 128), True, None, None, False),
        ((2, 200, 300, 2, 1, 128), (64, 64), False, 90, 30.0, True),
    ],
)
def test_lowers_to_mosaic_gpu(shape, blocks, causal, window, softcap, segmented):
    """The bf16 kernel (interpret=False) passes the Pallas -> Mosaic GPU lowering for CUDA."""
    b, q_len, kv_len, h, h_kv, d = shape
    cfg = _config(inputs.make_mask(causal, window), d, blocks, softcap, interpret=False)
    q = jax.ShapeDtypeStruct((b, q_len, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, kv_len, h_kv, d), jnp.bfloat16)
    q_pos, kv_pos = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (q_len, kv_len))
    q_seg, kv_seg = ((jax.ShapeDtypeStruct((b, n), jnp.int32) for n in (q_len, kv_len))
                     if segmented else (None, None))
    fwd = jax.jit(lambda *a: api.kernel_forward(*a, cfg=cfg, out_dtype=jnp.bfloat16))
    text = fwd.trace(q, kv, kv, q_pos, kv_pos, q_seg, kv_seg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_lowers_with_more_than_256_key_blocks():
    """Bug 2 of issue 15: the key-block list row (300 blocks) goes to SMEM in TMA pieces of <= 256."""
    q_len, kv_len, d = 64, 300 * 64, 64
    cfg = _config(inputs.make_mask(False, None), d, (64, 64), None, interpret=False)
    q = jax.ShapeDtypeStruct((1, q_len, 1, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, kv_len, 1, d), jnp.bfloat16)
    q_pos, kv_pos = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (q_len, kv_len))
    fwd = jax.jit(lambda *a: api.kernel_forward(*a, cfg=cfg, out_dtype=jnp.bfloat16))
    text = fwd.trace(q, kv, kv, q_pos, kv_pos, None, None).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
