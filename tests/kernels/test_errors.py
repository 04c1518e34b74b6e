"""Bad inputs to the kernels fail at trace time with a ValueError that says what would work."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from kernels_pallas.blocks import check_dtype
from kernels_pallas.block_math import visible
from lca.attention.blocks import BlockSizes
from lca.attention.mask import Mask

Q = jnp.zeros((1, 32, 4, 16))
KV = jnp.zeros((1, 32, 2, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="cuda"), "backend must be"),
        (dict(backend="tpu", block_q=100), "block_q=100 .* multiple of 128"),
        (dict(block_q=0), "block_q must be a positive int"),
        (dict(interpret="yes"), "interpret must be a bool"),
        (dict(window=0), "window must be a positive int"),
        (dict(softcap=-1.0), "softcap must be a positive"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(Q, KV, KV, **kwargs)


def test_bad_shapes_and_head_dims():
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_kv_heads"):
        flash_attention(Q, jnp.zeros((1, 32, 3, 16)), jnp.zeros((1, 32, 3, 16)))
    with pytest.raises(ValueError, match="must be 4-D"):
        flash_attention(Q[0], KV, KV)
    with pytest.raises(ValueError, match="block_kv=96 .* multiple of 128"):
        flash_attention(jnp.zeros((1, 8, 2, 64)), *[jnp.zeros((1, 8, 2, 64))] * 2,
                        backend="tpu", block_kv=96)
    with pytest.raises(ValueError, match="head_dim=512 is too large"):
        flash_attention(jnp.zeros((1, 8, 2, 512)), *[jnp.zeros((1, 8, 2, 512))] * 2)
    with pytest.raises(ValueError, match="segment_ids must have|q_segment_ids must have"):
        flash_attention(Q, KV, KV, segment_ids=jnp.zeros((1, 31), jnp.int32))
    with pytest.raises(ValueError, match="block_kv must be a positive int"):
        BlockSizes(64, -1)


@pytest.mark.parametrize("mask", [Mask(), Mask(causal=True), Mask(window=3), Mask(True, 4)])
def test_tile_visibility_is_the_mask_rule(mask):
    q_pos = jnp.arange(-3, 9, dtype=jnp.int32)
    kv_pos = jnp.arange(0, 10, dtype=jnp.int32)[::-1]
    valid = jnp.ones((1, 10), bool)
    tile = visible(mask, q_pos[:, None], kv_pos[None, :], valid)
    np.testing.assert_array_equal(tile, mask.visible(q_pos, kv_pos))


def test_mosaic_gpu_limits():
    d64 = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError, match="block_q=96 .* mosaic_gpu .* power of two >= 64"):
        flash_attention(d64, d64, d64, backend="mosaic_gpu", block_q=96)
    with pytest.raises(ValueError, match="head_dim=16 is not valid for the mosaic_gpu kernel"):
        flash_attention(Q, KV, KV, backend="mosaic_gpu")
    d256 = jnp.zeros((1, 512, 1, 256))
    with pytest.raises(ValueError, match="KiB of shared memory"):
        flash_attention(d256, d256, d256, backend="mosaic_gpu", block_q=128, block_kv=256)
    with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs, got float32"):
        check_dtype(jnp.float32, "mosaic_gpu", interpret=False)
    check_dtype(jnp.float32, "mosaic_gpu", interpret=True)  # interpret mode accepts float32
    # The backward's own tiles reach its checks from flash_attention.
    with pytest.raises(ValueError, match="block_q_bwd=32 is not valid for the mosaic_gpu backward"):
        flash_attention(d64, d64, d64, backend="mosaic_gpu", block_q_bwd=32)
    with pytest.raises(ValueError, match=r"block_q_bwd=128, block_kv_bwd=128 need an estimated \d+ bytes"):
        flash_attention(d256[..., :128], d256[..., :128], d256[..., :128], backend="mosaic_gpu",
                        block_q_bwd=128, block_kv_bwd=128)
