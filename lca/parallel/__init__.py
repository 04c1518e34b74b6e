"""Meshes, shardings and sequence permutations."""

from lca.parallel.layout import (
    LAYOUTS,
    from_layout,
    inverse_permutation,
    local_positions,
    permutation,
    shard_from_layout,
    shard_to_layout,
    striped_permutation,
    to_layout,
    zigzag_permutation,
)
from lca.parallel.mesh import MESH_AXES, make_mesh, resolve_axis_sizes

__all__ = [
    "LAYOUTS",
    "MESH_AXES",
    "from_layout",
    "inverse_permutation",
    "local_positions",
    "make_mesh",
    "permutation",
    "resolve_axis_sizes",
    "shard_from_layout",
    "shard_to_layout",
    "striped_permutation",
    "to_layout",
    "zigzag_permutation",
]
