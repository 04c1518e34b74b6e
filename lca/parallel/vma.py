"""Varying-manual-axes bookkeeping for code that runs inside ``jax.shard_map``.

Inside ``shard_map`` every value carries the set of manual mesh axes it varies
over. A freshly created accumulator (``jnp.zeros``) varies over none, while the
per-device results added into it vary over the sharded axes, and ``scan`` /
``cond`` demand equal types. ``varying_like`` marks fresh values accordingly;
outside ``shard_map`` it is the identity.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # older spelling


def union_varying_axes(*refs) -> frozenset:
    """The manual mesh axes any leaf of ``refs`` varies over."""
    return frozenset().union(*(varying_axes(r) for r in jax.tree.leaves(refs)))


def mark_varying(tree, axis_names):
    """Mark every leaf of ``tree`` as varying over ``axis_names`` (a name or names).

    E.g. a loop carry that is the same on every device (replicated positions)
    but becomes per-device after one ``ppermute`` has to start as varying.
    """
    axes = frozenset((axis_names,) if isinstance(axis_names, str) else axis_names)
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def varying_like(tree, *refs):
    """Mark every leaf of ``tree`` as varying over the union of ``refs``' varying axes."""
    return mark_varying(tree, union_varying_axes(*refs))


def varying_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct`` of a value varying over the manual mesh axes of ``like``.

    For the ``out_shape`` of a ``pallas_call``: inside a ``shard_map`` with
    ``check_vma`` its outputs must say which manual axes they vary over
    (outside one the set is empty).
    """
    axes = union_varying_axes(*like)
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
