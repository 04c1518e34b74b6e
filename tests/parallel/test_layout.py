"""Sequence layouts: permutations, their inverses, and the in-shard_map conversions."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.parallel import (
    from_layout,
    local_positions,
    make_mesh,
    permutation,
    shard_from_layout,
    shard_to_layout,
    striped_permutation,
    to_layout,
    zigzag_permutation,
)
from lca.parallel.layout import position_runs


def test_zigzag_device_i_holds_chunks_i_and_2n_minus_1_minus_i():
    perm = zigzag_permutation(16, 4)  # 8 chunks of 2
    np.testing.assert_array_equal(perm.reshape(4, 4), [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])
    np.testing.assert_array_equal(striped_permutation(8, 4), [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(permutation("contiguous", 8, 4), np.arange(8))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_to_from_layout_round_trip_and_local_positions(layout):
    x = np.arange(2 * 24).reshape(2, 24)
    y = to_layout(x, layout, 3)
    np.testing.assert_array_equal(from_layout(y, layout, 3), x)
    np.testing.assert_array_equal(
        y[0], np.concatenate([local_positions(layout, 8, 3, i) for i in range(3)]))


@pytest.mark.parametrize("layout,n,runs", [("zigzag", 4, 8), ("contiguous", 4, 4), ("striped", 4, None),
                                            ("zigzag", 1, 1), ("striped", 1, 1)])
def test_position_runs_counts_the_runs_of_consecutive_positions(layout, n, runs):
    assert position_runs(layout, n) == runs
    if runs is not None:  # the permutation is that many equal chunks of consecutive positions
        assert all(np.all(np.diff(chunk) == 1) for chunk in np.split(permutation(layout, 64, n), runs))
    else:  # striped: no two neighbours on a device are consecutive
        assert not np.any(np.diff(np.split(permutation(layout, 64, n), n)[0]) == 1)


def test_bad_lengths_and_layouts():
    with pytest.raises(ValueError, match=r"sequence length 12 must be a multiple of 8 .*zigzag"):
        zigzag_permutation(12, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        permutation("spiral", 8, 2)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_shard_conversion_matches_global_permutation(layout):
    """Collective conversion on contiguous shards == global to_layout, and back."""
    n = 4
    mesh = make_mesh(context=n, devices=jax.devices()[:n], axis_types="auto")
    x = np.arange(2 * 32 * 3, dtype=np.float32).reshape(2, 32, 3)
    spec = P(None, "context")

    def roundtrip(x):
        y = shard_to_layout(x, layout, "context")
        return y, shard_from_layout(y, layout, "context")

    y, back = jax.jit(jax.shard_map(roundtrip, mesh=mesh, in_specs=spec, out_specs=(spec, spec)))(
        jax.device_put(x, NamedSharding(mesh, spec)))
    np.testing.assert_array_equal(np.asarray(y), to_layout(x, layout, n))
    np.testing.assert_array_equal(np.asarray(back), x)
