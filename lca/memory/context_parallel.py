"""The Titans memory on a context-sharded mesh: an exact pipelined scan with ``ppermute``.

:func:`context_parallel` pipelines any recurrence that carries a state along the
sequence; the neural memory (:func:`context_parallel_memory`, used by LMM, MAG and
MAL) and MAC's segment scan (:func:`lca.memory.mac.mac_layer`) run on it.

The memory is a recurrence over the sequence, so device ``i`` (holding the ``i``-th
contiguous shard of every row) needs the state that device ``i - 1`` ends with. The
whole :class:`~lca.memory.neural_memory.MemoryState` (chunk-start weights, momentum,
open chunk, conv tail) travels, so the result is exactly the single-device one: no
stale weights, and the chunk grid need not align with the shards.

To keep devices busy the batch is cut into ``micro_batches``: at pipeline step ``s``
device ``i`` runs micro-batch ``s - i`` and hands its end state to device ``i + 1``
(GPipe-style). With ``P`` devices and ``M`` micro-batches there are ``M + P - 1`` steps,
so the idle fraction of the schedule is ``(P - 1) / (M + P - 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lca.memory.neural_memory import MemoryConfig, document_starts, fresh_state, memory_layer
from lca.parallel.vma import mark_varying, union_varying_axes


def idle_fraction(devices: int, micro_batches: int) -> float:
    """Share of pipeline steps a device waits: ``(P - 1) / (M + P - 1)``."""
    return (devices - 1) / (micro_batches + devices - 1)


def pipeline_shard(run, first, xs, *, axis_name: str, micro_batches: int = 1):
    """Inside ``shard_map``: a recurrence over the contiguous shards of ``axis_name``, pipelined.

    ``run(state, x) -> (y, end_state)`` processes one micro-batch of this device's shard
    (``x``: a pytree of ``[rows, l_local, ...]`` arrays) from ``state``. ``xs`` is that pytree
    for all of this device's rows (``[b, l_local, ...]`` leaves, ``b`` divisible by
    ``micro_batches``); ``first`` is the state a sequence starts from (used on the first
    device), for ``b / micro_batches`` rows. Returns ``y`` for all rows, ``[b, l_local, ...]``.
    """
    b = jax.tree.leaves(xs)[0].shape[0]
    if b % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide the batch {b}")
    devices = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    xs = jax.tree.map(lambda a: a.reshape(micro_batches, b // micro_batches, *a.shape[1:]), xs)
    # the state becomes per-device after the first ppermute (and per-row-shard when the batch
    # is split too), so it starts as varying over those axes
    first = mark_varying(first, union_varying_axes(xs) | {axis_name})
    forward = [(i, i + 1) for i in range(devices - 1)]
    y_shape = jax.eval_shape(run, first, jax.tree.map(lambda a: a[0], xs))[0]

    def step(carry, s):
        inbox, ys = carry
        m = s - index
        active = (m >= 0) & (m < micro_batches)
        mc = jnp.clip(m, 0, micro_batches - 1)
        start = jax.tree.map(lambda a, r: jnp.where(index == 0, a, r), first, inbox)
        y, end = run(start, jax.tree.map(lambda a: a[mc], xs))
        ys = jnp.where(active, ys.at[mc].set(y), ys)
        return (jax.lax.ppermute(end, axis_name, forward), ys), None

    steps = jnp.arange(micro_batches + devices - 1)
    ys = jnp.zeros((micro_batches, *y_shape.shape), y_shape.dtype)
    ys = mark_varying(ys, union_varying_axes(xs) | {axis_name})
    (_, ys), _ = jax.lax.scan(step, (first, ys), steps)
    return ys.reshape(b, *ys.shape[2:])


def context_parallel(
    run: Callable,
    first: Callable,
    params,
    xs,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "context",
    micro_batches: int = 1,
    batch_axes: tuple[str, ...] = (),
):
    """A recurrence over whole sequences ``xs`` split over ``mesh[axis_name]``, pipelined exactly.

    ``xs``: a pytree of ``[b, l, ...]`` arrays (e.g. ``x`` and its positions). ``run(params,
    state, x) -> (y, end_state)`` processes a piece of every row from ``state``, and
    ``first(params, rows)`` is the state a sequence starts from. The result, ``[b, l, ...]``,
    equals ``run(params, first(params, b), xs)[0]`` when ``run`` composes over pieces (running
    two pieces in turn equals running them joined). ``l`` must divide evenly over the devices.
    ``batch_axes``: mesh axes the batch is split over as well (rows are independent);
    ``micro_batches`` then divides each device's share of the batch.
    """
    if not isinstance(mesh, jax.sharding.Mesh) or axis_name not in mesh.shape:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis {axis_name!r}, got {mesh!r}")
    devices = mesh.shape[axis_name]
    shapes = [a.shape for a in jax.tree.leaves(xs)]
    if any(len(s) < 2 or s[:2] != shapes[0][:2] for s in shapes) or shapes[0][1] % devices:
        raise ValueError(
            f"inputs must be [batch, length, ...] with one batch and length, the length divisible by the "
            f"{devices} devices of {axis_name!r}, got shapes {shapes}"
        )
    split = math.prod(mesh.shape[a] for a in batch_axes)
    if axis_name in batch_axes or shapes[0][0] % (split * micro_batches):
        raise ValueError(
            f"micro_batches={micro_batches} must divide the batch {shapes[0][0]} per device of "
            f"batch_axes={batch_axes} (size {split}), which must not hold {axis_name!r}"
        )
    spec = P(batch_axes or None, axis_name)

    def body(params, xs):
        rows = jax.tree.leaves(xs)[0].shape[0] // micro_batches
        step = functools.partial(run, params)
        return pipeline_shard(step, first(params, rows), xs, axis_name=axis_name, micro_batches=micro_batches)

    if mesh.axis_types[mesh.axis_names.index(axis_name)] != jax.sharding.AxisType.Explicit:
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), spec), out_specs=spec)(params, xs)
    # Explicit axes: the sharding is in the type. Shard the inputs as the pipeline needs, and give the
    # result the (batch, length) sharding of the first input: sharded over `axis_name` only where the
    # input was, so that an unsharded x gives an unsharded result (and cotangent), as on one device.
    given = (tuple(jax.typeof(jax.tree.leaves(xs)[0]).sharding.spec) + (None, None))[:2]
    xs = jax.tree.map(lambda a: jax.sharding.reshard(a, NamedSharding(mesh, spec)), xs)
    out = jax.shard_map(body, mesh=mesh, in_specs=(P(), spec), out_specs=spec)(params, xs)
    return jax.tree.map(lambda a: jax.sharding.reshard(a, NamedSharding(mesh, P(*given))), out)


def context_parallel_memory(
    params: dict,
    x: jax.Array,
    *,
    config: MemoryConfig,
    mesh: jax.sharding.Mesh,
    axis_name: str = "context",
    micro_batches: int = 1,
    batch_axes: tuple[str, ...] = (),
    restarts: jax.Array | None = None,
) -> jax.Array:
    """The memory layer (from a fresh state) on ``x [b, l, d_model]`` split over ``mesh[axis_name]``.

    Equals ``memory_layer(params, fresh_state(...), x, restarts=restarts)[0]``; ``l`` must divide evenly.
    ``batch_axes`` and ``micro_batches`` as in :func:`context_parallel`; ``restarts [b, l]`` (packed
    documents) travel with ``x``, and the open chunk's flags with the state.
    """
    return context_parallel(
        lambda p, state, xr: memory_layer(p, state, xr[0], config=config, restarts=xr[1]),
        lambda p, rows: fresh_state(p, config, rows),
        params, (x, restarts),  # restarts may be None: an empty subtree the pipeline passes through
        mesh=mesh, axis_name=axis_name, micro_batches=micro_batches, batch_axes=batch_axes,
    )


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """Where a sequence is split: pipelined over ``axis``, rows over ``batch_axes``."""

    mesh: jax.sharding.Mesh
    axis: str
    batch_axes: tuple[str, ...] = ()
    micro_batches: int = 1


def fresh_memory(params: dict, x: jax.Array, *, config: MemoryConfig, split: ContextSplit | None = None,
                 segment_ids: jax.Array | None = None):
    """The memory's output on a whole sequence ``x [b, l, d_model]`` from :func:`fresh_state`.

    One device (``split=None``), or exactly the same result pipelined over ``split``. ``segment_ids [b, l]``:
    packed documents; the memory restarts at each (:func:`lca.memory.neural_memory.document_starts`).
    """
    restarts = None if segment_ids is None else document_starts(segment_ids)
    if split is None:
        return memory_layer(params, fresh_state(params, config, x.shape[0]), x, config=config, restarts=restarts)[0]
    return context_parallel_memory(params, x, config=config, mesh=split.mesh, axis_name=split.axis,
                                   micro_batches=split.micro_batches, batch_axes=split.batch_axes, restarts=restarts)
