"""BlockSizes, the one block-size type: validation once, NumPy integers, defaults, backward sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from lca.attention import BlockSizes, blockwise_attention, reference_attention
from lca.attention.impl import get_impl
from lca.attention.tiling import Tiling, pad_axis
from tests.oracle import random_qkv

Q = jnp.zeros((1, 8, 2, 16))


@pytest.mark.parametrize("attention", [blockwise_attention, flash_attention], ids=["blockwise", "pallas"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=0), r"block_q must be a positive int, got block_q=0"),
    (dict(block_kv=-4), r"block_kv must be a positive int, got block_kv=-4"),
    (dict(block_q=2.5), r"block_q must be a positive int .* got 2.5 of type float"),
    (dict(block_kv=True), r"block_kv must be a positive int, got the bool True"),
    (dict(block_q=np.int64(0)), r"block_q must be a positive int, got block_q=0"),
    (dict(block_q_bwd=0), r"block_q_bwd must be a positive int, got block_q_bwd=0"),
    (dict(block_kv_bwd=2.5), r"block_kv_bwd must be a positive int .* got 2.5 of type float"),
])
def test_bad_block_sizes_name_the_argument(attention, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention(Q, Q, Q, **kwargs)


def test_traced_block_size_says_how_to_make_it_static():
    with pytest.raises(ValueError, match=r"block_q must be a static Python value.*static_argnames"):
        jax.jit(blockwise_attention)(Q, Q, Q, block_q=8)


def test_numpy_integers_are_accepted():
    q, k, v = random_qkv(0, 1, 20, 20, 2, 1, 8)
    want = reference_attention(q, k, v, causal=True, window=5)
    for attention in (blockwise_attention, flash_attention):
        got = attention(q, k, v, causal=True, window=np.int64(5), block_q=np.int64(16),
                        block_kv=np.int32(16))
        np.testing.assert_allclose(got, want, atol=2e-6)
    blocks = BlockSizes(np.int64(16), np.int32(8))
    assert blocks == BlockSizes(16, 8) and type(blocks.block_q) is int
    assert hash(blocks) == hash(BlockSizes(16, 8))


def test_none_is_the_backends_default_and_backward_sizes_fall_back():
    blocks = BlockSizes(block_kv=64)
    assert blocks.or_defaults(BlockSizes(512, 512)) == BlockSizes(512, 64)
    assert blocks.or_defaults(BlockSizes(512, 512)).backward == BlockSizes(512, 64)
    assert BlockSizes(32, 64, block_kv_bwd=16).backward == BlockSizes(32, 16)


def test_backward_blocks_of_their_own_give_the_same_gradients():
    from lca.attention import blockwise_backward, blockwise_forward
    from lca.attention.inputs import logit_options, make_mask, positions

    q, k, v = random_qkv(1, 1, 24, 24, 2, 1, 8)
    q_pos, kv_pos = positions(None, None, 24, 24)
    kw = dict(mask=make_mask(True, None), logit=logit_options(8))
    out, lse = blockwise_forward(q, k, v, q_pos, kv_pos, **kw, blocks=BlockSizes(8, 8))
    dout = jnp.ones_like(out)
    same = blockwise_backward(q, k, v, q_pos, kv_pos, None, None, out, lse, dout, **kw,
                              blocks=BlockSizes(8, 8))
    own = blockwise_backward(q, k, v, q_pos, kv_pos, None, None, out, lse, dout, **kw,
                             blocks=BlockSizes(8, 8, block_q_bwd=16, block_kv_bwd=4))
    for a, b in zip(same, own):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_blockwise_attention_tiles_its_backward_with_its_own_blocks(monkeypatch):
    """block_q_bwd/block_kv_bwd reach the backward's tiling (odd sizes: padded tiles), and
    every gradient still equals the oracle's."""
    from lca.attention import blockwise
    from tests.oracle import assert_matches_oracle

    tilings = []
    real = blockwise._tiling

    def spy(q_len, kv_len, blocks, backward):
        tiling = real(q_len, kv_len, blocks, backward)
        tilings.append((backward, tiling.block_q, tiling.block_kv))
        return tiling

    monkeypatch.setattr(blockwise, "_tiling", spy)
    q, k, v = random_qkv(2, 2, 24, 24, 4, 2, 8)
    assert_matches_oracle(
        lambda q, k, v: blockwise_attention(q, k, v, causal=True, window=9, block_q=8, block_kv=8,
                                            block_q_bwd=5, block_kv_bwd=7, return_lse=True),
        q, k, v, bound=2e-5, causal=True, window=9)
    assert set(tilings) == {(False, 8, 8), (True, 5, 7)}


def test_tiling_pads_to_whole_blocks():
    tiling = Tiling.of(10, 7, BlockSizes(4, 4))
    assert (tiling.num_q, tiling.num_kv, tiling.q_padded, tiling.kv_padded) == (3, 2, 12, 8)
    pos = tiling.kv_position_blocks(jnp.arange(7) + 3)
    np.testing.assert_array_equal(pos, [[3, 4, 5, 6], [7, 8, 9, 9]])  # edge padded
    assert pad_axis(jnp.ones((2, 5)), 1, 8).shape == (2, 8)


def test_tile_options_go_only_to_impls_that_take_tiles():
    """``as_options``: all four sizes (None: the impl's default) for blockwise/pallas/cudnn, none for reference/xla."""
    assert BlockSizes(4, 4).as_options(get_impl("reference")) == {}
    assert BlockSizes(4, 4).as_options(get_impl("xla")) == {}
    for impl in ("blockwise", "pallas", "cudnn"):
        assert BlockSizes(4).as_options(get_impl(impl)) == dict(block_q=4, block_kv=None, block_q_bwd=None,
                                                                block_kv_bwd=None)


def test_sizes_are_read_off_a_config_by_name():
    from lca.config import AttentionConfig

    assert BlockSizes.of(AttentionConfig(block_q=8, block_kv_bwd=2)) == BlockSizes(8, None, None, 2)
    with pytest.raises(ValueError, match="block_q_bwd must be a positive int, got block_q_bwd=0"):
        BlockSizes.of(AttentionConfig(block_q_bwd=0))
