"""Meshes, shardings and sequence permutations."""

from lca.parallel.mesh import MESH_AXES, make_mesh, resolve_axis_sizes
from lca.parallel.vma import varying_axes, varying_like

__all__ = ["MESH_AXES", "make_mesh", "resolve_axis_sizes", "varying_axes", "varying_like"]
