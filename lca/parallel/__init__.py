"""Meshes, shardings and sequence permutations."""

from lca.parallel.mesh import MESH_AXES, make_mesh, resolve_axis_sizes

__all__ = ["MESH_AXES", "make_mesh", "resolve_axis_sizes"]
