"""Meshes, shardings, sequence permutations and the collectives that move sequence shards."""

from lca.parallel.collectives import gather_seq, heads_to_seq, seq_to_heads
from lca.parallel.devices import use_cpu_devices
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
from lca.parallel.vma import mark_varying, varying_axes, varying_like

__all__ = [
    "LAYOUTS",
    "MESH_AXES",
    "from_layout",
    "gather_seq",
    "heads_to_seq",
    "inverse_permutation",
    "local_positions",
    "make_mesh",
    "permutation",
    "resolve_axis_sizes",
    "seq_to_heads",
    "shard_from_layout",
    "shard_to_layout",
    "striped_permutation",
    "to_layout",
    "use_cpu_devices",
    "mark_varying",
    "varying_axes",
    "varying_like",
    "zigzag_permutation",
]
