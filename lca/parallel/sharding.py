"""Logical axis names -> mesh axes.

Parameters and activations are annotated with *logical* axis names ("embed",
"heads", "batch", "sequence", ...); the config's ``rules`` map each name to zero
or more mesh axes. Keeping the two apart lets one model run data-parallel,
FSDP, context- or tensor-parallel by changing config only.

A mesh axis is used at most once per array, and an axis that does not divide
the dimension is dropped (that dimension is replicated over it) rather than
failing: small test models then run on any mesh.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = Mapping[str, Sequence[str]]


def logical_to_spec(
    logical: Sequence[str | None], rules: Rules, mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None
) -> P:
    """The mesh ``PartitionSpec`` of an array with these logical axis names.

    >>> logical_to_spec(("batch", "sequence", "act_embed"), rules, mesh)
    PartitionSpec(('data', 'fsdp'), 'context', None)
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical):
        if name is not None and name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules cover {sorted(rules)}. "
                "Add it to the config's `rules`."
            )
        axes = []
        size = 1
        for axis in rules.get(name, ()) if name is not None else ():
            if axis not in mesh.shape:
                raise ValueError(f"sharding rule {name!r} names mesh axis {axis!r}; mesh axes are {tuple(mesh.shape)}.")
            if axis in used or mesh.shape[axis] == 1:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[axis]):
                continue
            axes.append(axis)
            size *= mesh.shape[axis]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def named_sharding(logical, rules: Rules, mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, shape))


def tree_shardings(logical_specs, abstract, rules: Rules, mesh):
    """Shardings for a pytree of arrays from a matching pytree of logical ``PartitionSpec``s."""
    return jax.tree.map(
        lambda spec, x: named_sharding(tuple(spec), rules, mesh, x.shape),
        logical_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, P),
    )


class Sharder:
    """Constrains activations to the layout the rules give (a no-op without a mesh)."""

    def __init__(self, rules: Rules | None = None, mesh: jax.sharding.Mesh | None = None):
        self.rules = dict(rules or {})
        self.mesh = mesh

    def __call__(self, x, logical: Sequence[str | None]):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, named_sharding(logical, self.rules, self.mesh, x.shape))
