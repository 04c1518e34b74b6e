"""The block predicates the loops and kernels skip and unmask by, against the element rule."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention.mask import Mask, segment_begins

MASKS = [Mask(causal=True), Mask(window=3), Mask(causal=True, window=3), Mask(causal=True, window=1)]


def _ranges(limit=7):
    return [(lo, hi) for lo in range(limit) for hi in range(lo, limit)]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_block_predicates_match_every_pair_of_contiguous_ranges(mask):
    for (q_lo, q_hi), (kv_lo, kv_hi) in itertools.product(_ranges(), _ranges()):
        seen = np.asarray(mask.visible(np.arange(q_lo, q_hi + 1), np.arange(kv_lo, kv_hi + 1)))
        where = (q_lo, q_hi, kv_lo, kv_hi)
        assert bool(mask.block_visible(*where)) == bool(seen.any()), where
        assert bool(mask.block_full(*where)) == bool(seen.all()), where


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_block_full_holds_for_any_positions_inside_the_ranges(mask):
    """A zigzag or striped block's positions are not contiguous: 'full' must still be safe."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        q_pos, kv_pos = rng.integers(0, 12, size=4), rng.integers(0, 12, size=4)
        if mask.block_full(q_pos.min(), q_pos.max(), kv_pos.min(), kv_pos.max()):
            assert np.asarray(mask.visible(q_pos, kv_pos)).all(), (q_pos, kv_pos)


def test_segment_begins_marks_each_run_start_for_numpy_and_jax_alike():
    ids = np.array([[1, 1, 2, 2, 2, 0, 0, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    want = np.array([[1, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]], bool)
    host = segment_begins(ids)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, want)
    np.testing.assert_array_equal(np.asarray(segment_begins(jnp.asarray(ids))), want)
    np.testing.assert_array_equal(segment_begins(ids[0]), want[0])  # any leading axes, none included
