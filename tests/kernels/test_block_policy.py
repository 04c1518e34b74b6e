"""The block-size policy on CPU: per-device defaults, forward/backward tiles and warps, fit errors.

The device kind is passed explicitly, so these run without a GPU; the estimate is
calibrated on the one reading issue 15 gives (Triton asked for 262144 bytes of shared
memory at 512 x 512, head_dim 128, bf16, on an H100 with 232448).
"""

import jax.numpy as jnp
import pytest

from kernels_pallas import api
from kernels_pallas import blocks as blocks_lib
from lca.attention import inputs
from lca.attention.blocks import BlockSizes

H100 = "NVIDIA H100 80GB HBM3"


def _plan(backend, blocks=None, d=128, length=32768, device_kind=H100, dtype=jnp.bfloat16):
    return blocks_lib.plan(blocks, length, length, backend, False, d, dtype=dtype, device_kind=device_kind)


def test_issue_bug_1_is_a_value_error_naming_the_estimate_and_what_fits():
    with pytest.raises(ValueError) as err:
        _plan("gpu_portable", BlockSizes(512, 512))
    message = str(err.value)
    assert "block_q=512, block_kv=512" in message and H100 in message
    assert "262144 bytes of shared memory (232448 available)" in message
    assert "largest sizes that fit: block_q=" in message


def test_the_sizes_the_error_offers_fit():
    with pytest.raises(ValueError, match=r"largest sizes that fit: block_q=(\d+), block_kv=(\d+)") as err:
        _plan("gpu_portable", BlockSizes(256, 256))
    import re

    bq, bk = map(int, re.search(r"fit: block_q=(\d+), block_kv=(\d+)", str(err.value)).groups())
    assert bq * bk < 256 * 256
    _plan("gpu_portable", BlockSizes(bq, bk, 64, 64))


@pytest.mark.parametrize("backend", ["gpu_portable", "mosaic_gpu"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", [H100, "NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"])
def test_defaults_fit_every_known_gpu(backend, d, kind):
    if backend == "mosaic_gpu" and not kind.startswith("NVIDIA H"):
        pytest.skip("mosaic_gpu is Hopper only")
    plan = _plan(backend, d=d, device_kind=kind)  # raises if the policy's own default does not fit
    assert None not in (plan.blocks.block_q, plan.blocks.block_kv, plan.blocks.block_q_bwd, plan.blocks.block_kv_bwd)


def test_backward_has_its_own_tiles_and_warps_on_a_gpu():
    """Issue 15 bug 3: the mosaic_gpu backward no longer reuses the forward's (64, 128) with 4 warps."""
    plan = _plan("mosaic_gpu")
    assert (plan.blocks.block_q, plan.blocks.block_kv) == (64, 128)
    assert (plan.blocks.block_q_bwd, plan.blocks.block_kv_bwd) != (64, 128)
    assert (plan.blocks.block_q_bwd, plan.blocks.block_kv_bwd) == blocks_lib.MOSAIC_GPU_BWD_DEFAULT
    # The backward's tiles are checked by its own kernels' SMEM, not by the portable kernels' model:
    # (128, 64) at head_dim 64 fits the Mosaic GPU backward (the portable estimate said no).
    assert _plan("mosaic_gpu", BlockSizes(None, None, 128, 64), d=64).blocks == BlockSizes(64, 128, 128, 64)
    with pytest.raises(ValueError, match=r"block_q_bwd=64, block_kv_bwd=128 need an estimated \d+ bytes.*"
                                         r"sizes that fit: \(64, 64\)"):
        _plan("mosaic_gpu", BlockSizes(64, 128, 64, 128))
    # Above head_dim 128 the backward is the portable kernels, checked by their rules and warps.
    plan = _plan("mosaic_gpu", BlockSizes(64, 64), d=256)
    assert (plan.blocks.block_q_bwd, plan.blocks.block_kv_bwd, plan.warps_bwd) == (32, 32, 8)


def test_without_a_known_gpu_the_generic_sizes_apply_unchecked():
    plan = _plan("gpu_portable", BlockSizes(512, 512), device_kind=None)
    assert plan.blocks == BlockSizes(512, 512, 512, 512)
    assert _plan("gpu_portable", BlockSizes(32), device_kind="cpu").blocks == BlockSizes(32, 64, 32, 64)


def test_short_sequences_clamp_before_the_check():
    plan = _plan("gpu_portable", BlockSizes(512, 512), length=100)
    assert plan.blocks == BlockSizes(128, 128, 64, 64)  # the backward keeps its own default


def test_mosaic_gpu_blocks_over_256_are_a_clear_error():
    with pytest.raises(ValueError, match="block_q=512 is too large for the mosaic_gpu forward: its TMA copies"):
        _plan("mosaic_gpu", BlockSizes(512, 64), device_kind=None)


def test_float32_tiles_count_twice_the_bytes():
    small = blocks_lib.estimate("gpu_portable", False, 128, 128, 128, 2, 8)
    big = blocks_lib.estimate("gpu_portable", False, 128, 128, 128, 4, 8)
    assert big.smem_bytes == 2 * small.smem_bytes


def test_resolve_config_takes_the_device_kind_and_passes_warps():
    kw = dict(mask=inputs.make_mask(True, None), logit=inputs.logit_options(128, None, None),
              backend="gpu_portable", dtype=jnp.bfloat16)
    cfg = api.resolve_config(128, 8192, 8192, device_kind=H100, **kw)
    assert (cfg.warps_fwd, cfg.warps_bwd) == (8, 8) and cfg.blocks.block_q == 128
    with pytest.raises(ValueError, match="do not fit the gpu_portable forward on NVIDIA H100"):
        api.resolve_config(128, 8192, 8192, device_kind=H100, blocks=BlockSizes(512, 512), **kw)


def test_portable_tiles_and_warps_follow_head_dim():
    """As JAX's Triton example: 4 warps up to head_dim 64, 8 above; the backward its own, smaller tiles."""
    plans = {d: _plan("gpu_portable", d=d) for d in (32, 64, 128, 256)}
    assert [plan.warps_fwd for plan in plans.values()] == [4, 4, 8, 8]
    assert [plan.warps_bwd for plan in plans.values()] == [4, 4, 8, 8]
    area = lambda bq, bk: bq * bk  # noqa: E731
    for plan in plans.values():
        b = plan.blocks
        assert area(b.block_q_bwd, b.block_kv_bwd) < area(b.block_q, b.block_kv)
    assert area(plans[256].blocks.block_q, plans[256].blocks.block_kv) < area(plans[128].blocks.block_q,
                                                                             plans[128].blocks.block_kv)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", [H100, "NVIDIA A100-SXM4-80GB", "NVIDIA L4"])
def test_float32_defaults_shrink_to_fit(d, kind):
    """The bf16 defaults in float32 (twice the bytes) would not fit an L4: the default halves instead."""
    plan = _plan("gpu_portable", d=d, device_kind=kind, dtype=jnp.float32)  # raises if it does not fit
    bf16 = _plan("gpu_portable", d=d, device_kind=kind)
    assert plan.blocks.block_q * plan.blocks.block_kv <= bf16.blocks.block_q * bf16.blocks.block_kv
    if kind == "NVIDIA L4" and d == 128:
        assert plan.blocks.block_q * plan.blocks.block_kv < bf16.blocks.block_q * bf16.blocks.block_kv


def test_a_gpu_not_in_the_table_is_judged_by_its_compute_capability():
    """An RTX 4090 (sm_89, 99 KiB) is not named in GPU_LIMITS: its capability still stops a compile crash."""
    rtx = dict(device_kind="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    assert blocks_lib.gpu_limits(**rtx).smem_bytes == 99 * 1024
    with pytest.raises(ValueError, match=r"do not fit the gpu_portable forward on NVIDIA GeForce RTX 4090.*"
                                         r"\(101376 available\)"):
        blocks_lib.plan(BlockSizes(256, 256), 4096, 4096, "gpu_portable", False, 128, dtype=jnp.bfloat16, **rtx)
    plan = blocks_lib.plan(None, 4096, 4096, "gpu_portable", False, 128, dtype=jnp.bfloat16, **rtx)
    assert plan.warps_fwd == 8  # the known-GPU policy, not the generic sizes
    # A capability newer than the table gets its smallest shared memory, not no check at all.
    assert blocks_lib.gpu_limits("NVIDIA Future", "13.0").smem_bytes == 64 * 1024
    assert blocks_lib.gpu_limits("NVIDIA GeForce RTX 4090") is None and blocks_lib.gpu_limits(None) is None
