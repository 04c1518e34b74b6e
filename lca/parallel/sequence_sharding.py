"""Placing sequence-sharded attention inputs on a mesh, for Explicit and Auto axes alike.

The global attention entry points (ring, Ulysses, USP) take arrays with any
sharding (or none), run a ``jax.shard_map`` over the context axes, and hand the
result back with q's sharding. This module owns the mesh bookkeeping they share:
checking axis names, choosing the axes that shard the batch, and resharding.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

def mesh_axis_size(mesh, axis: str, *, arg: str = "axis") -> int:
    """Size of mesh axis ``axis``, or a ``ValueError`` listing the mesh's axes."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with a {axis!r} axis, got {type(mesh).__name__}; "
            f"e.g. mesh=lca.parallel.make_mesh(context=-1) (or jax.make_mesh)."
        )
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
        raise ValueError(
            f"{arg}={axis!r} is not an axis of the mesh; the mesh has axes {sizes}. Pass one of "
            f"{list(mesh.axis_names)} (e.g. make_mesh(context=-1) and {arg}='context')."
        )
    return int(mesh.shape[axis])


def batch_axes(mesh, used: tuple[str, ...], batch: int, requested=None) -> tuple[str, ...]:
    """Mesh axes that shard the batch dimension.

    ``requested=None`` takes, in mesh order, every axis of size > 1 not in
    ``used`` whose size still divides the batch (otherwise those devices would
    compute the same rows twice). An explicit tuple is checked and used as is.
    """
    if requested is not None:
        requested = (requested,) if isinstance(requested, str) else tuple(requested)
        for axis in requested:
            mesh_axis_size(mesh, axis, arg="batch_axes")
            if axis in used:
                raise ValueError(
                    f"batch_axes {requested} overlap the sequence axes {used}; a mesh axis "
                    f"can shard the batch or the sequence, not both."
                )
        total = math.prod(mesh.shape[a] for a in requested)
        if batch % total:
            raise ValueError(
                f"batch size {batch} is not divisible by the {total} devices of batch_axes "
                f"{requested}; use batch_axes=() or a batch that is a multiple of {total}."
            )
        return requested
    chosen, total = [], 1
    for axis in mesh.axis_names:
        size = mesh.shape[axis]
        if axis in used or size == 1 or batch % (total * size):
            continue
        chosen.append(axis)
        total *= size
    return tuple(chosen)


def _spec_axis(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def seq_spec(batch: tuple[str, ...], seq: tuple[str, ...], *, seq_dim: int = 1, ndim: int = 4) -> P:
    """PartitionSpec with the batch (dim 0) and the sequence (``seq_dim``) sharded."""
    parts = [None] * ndim
    parts[0] = _spec_axis(batch)
    parts[seq_dim] = _spec_axis(seq)
    return P(*parts)


def _explicit(mesh) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def constrain(x, mesh, spec: P):
    """Give ``x`` the sharding ``spec`` (``reshard`` on Explicit meshes, a constraint on Auto)."""
    sharding = NamedSharding(mesh, spec)
    if _explicit(mesh):
        return jax.sharding.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def _typed_on_explicit_mesh(x) -> bool:
    """Does ``x``'s type carry Explicit mesh axes (sharded on such a mesh, or under ``jax.set_mesh``)?"""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and not mesh.empty and _explicit(mesh)


def mesh_for_inputs(mesh, *arrays):
    """``mesh``, or the same devices with Auto axes when nothing here is typed on Explicit axes.

    On an Explicit mesh the result's type names the mesh. When neither the inputs
    (plain arrays) nor a ``jax.set_mesh`` context do, such a result makes an eager
    ``jax.grad`` fail: its cotangent is created on a mesh that no context
    provides. With Auto axes the result is typed like the inputs, and the
    computation and its shardings are the same.
    """
    typed = any(_typed_on_explicit_mesh(x) for x in arrays if x is not None)
    if not _explicit(mesh) or typed or not jax.sharding.get_abstract_mesh().empty:
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def match_sharding(out, like, mesh):
    """``out`` with the sharding of ``like`` when that is known (concrete or Explicit)."""
    if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer):
        return jax.device_put(out, like.sharding)
    sharding = getattr(jax.typeof(like), "sharding", None)
    spec = getattr(sharding, "spec", None)
    like_mesh = getattr(sharding, "mesh", None)
    if (_explicit(mesh) and spec is not None and like_mesh is not None
            and not like_mesh.empty and len(spec) <= out.ndim):
        return constrain(out, mesh, spec)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), static_argnames=("check_vma",))
def run(shard_fn, cfg, mesh, seq_axes: tuple, batch: tuple, q, k, v, q_seg, kv_seg, *,
        check_vma: bool = True):
    """``shard_fn(cfg, q, k, v, q_seg, kv_seg) -> (out, lse)`` over the sequence-sharded mesh.

    Inputs are resharded to batch over ``batch`` and sequence over ``seq_axes``
    (major to minor); ``out`` comes back sharded the same way, ``lse [b, h, len]``
    with its sequence (dim 2) sharded. ``check_vma``: type-check varying manual
    axes inside (off for local implementations that cannot be checked, see
    ``LocalImpl.check_vma``).
    """
    spec4 = seq_spec(batch, seq_axes)
    spec2 = seq_spec(batch, seq_axes, ndim=2)
    lse_spec = seq_spec(batch, seq_axes, seq_dim=2, ndim=3)
    args = [constrain(x, mesh, spec4) for x in (q, k, v)]
    segs = [None if s is None else constrain(s, mesh, spec2) for s in (q_seg, kv_seg)]
    return jax.shard_map(
        functools.partial(shard_fn, cfg), mesh=mesh,
        in_specs=(spec4, spec4, spec4, spec2, spec2), out_specs=(spec4, lse_spec),
        check_vma=check_vma,
    )(*args, *segs)
