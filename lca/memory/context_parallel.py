"""The Titans memory on a context-sharded mesh: an exact pipelined scan with ``ppermute``.

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

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lca.memory.neural_memory import MemoryConfig, fresh_state, memory_layer
from lca.parallel.vma import mark_varying, union_varying_axes


def idle_fraction(devices: int, micro_batches: int) -> float:
    """Share of pipeline steps a device waits: ``(P - 1) / (M + P - 1)``."""
    return (devices - 1) / (micro_batches + devices - 1)


def memory_layer_shard(params: dict, x: jax.Array, *, config: MemoryConfig, axis_name: str, micro_batches: int = 1):
    """Inside ``shard_map``: ``x [b, l_local, d_model]`` is this device's contiguous shard -> ``y`` alike.

    Every sequence starts from :func:`fresh_state` on the first device of ``axis_name``.
    """
    b, length, d = x.shape
    if b % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide the batch {b}")
    devices = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    xs = x.reshape(micro_batches, b // micro_batches, length, d)
    # the state becomes per-device after the first ppermute (and per-row-shard when the batch
    # is split too), so it starts as varying over those axes
    first = mark_varying(fresh_state(params, config, b // micro_batches), union_varying_axes(x) | {axis_name})
    forward = [(i, i + 1) for i in range(devices - 1)]

    def step(carry, s):
        inbox, ys = carry
        m = s - index
        active = (m >= 0) & (m < micro_batches)
        mc = jnp.clip(m, 0, micro_batches - 1)
        start = jax.tree.map(lambda a, r: jnp.where(index == 0, a, r), first, inbox)
        y, end = memory_layer(params, start, xs[mc], config=config)
        ys = jnp.where(active, ys.at[mc].set(y), ys)
        return (jax.lax.ppermute(end, axis_name, forward), ys), None

    steps = jnp.arange(micro_batches + devices - 1)
    (_, ys), _ = jax.lax.scan(step, (first, jnp.zeros_like(xs)), steps)
    return ys.reshape(b, length, d)


def context_parallel_memory(
    params: dict,
    x: jax.Array,
    *,
    config: MemoryConfig,
    mesh: jax.sharding.Mesh,
    axis_name: str = "context",
    micro_batches: int = 1,
    batch_axes: tuple[str, ...] = (),
) -> jax.Array:
    """The memory layer (from a fresh state) on ``x [b, l, d_model]`` split over ``mesh[axis_name]``.

    Equals ``memory_layer(params, fresh_state(...), x)[0]``; ``l`` must divide evenly.
    ``batch_axes``: mesh axes the batch is split over as well (rows are independent);
    ``micro_batches`` then divides each device's share of the batch.
    """
    if not isinstance(mesh, jax.sharding.Mesh) or axis_name not in mesh.shape:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis {axis_name!r}, got {mesh!r}")
    devices = mesh.shape[axis_name]
    if x.ndim != 3 or x.shape[1] % devices:
        raise ValueError(
            f"x must be [batch, length, d_model] with length divisible by the {devices} devices of "
            f"{axis_name!r}, got shape {x.shape}"
        )
    split = math.prod(mesh.shape[a] for a in batch_axes)
    if axis_name in batch_axes or x.shape[0] % (split * micro_batches):
        raise ValueError(
            f"micro_batches={micro_batches} must divide the batch {x.shape[0]} per device of "
            f"batch_axes={batch_axes} (size {split}), which must not hold {axis_name!r}"
        )
    spec = P(batch_axes or None, axis_name)
    body = functools.partial(memory_layer_shard, config=config, axis_name=axis_name, micro_batches=micro_batches)
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit:
        x = jax.sharding.reshard(x, NamedSharding(mesh, spec))  # explicit axes: the sharding is in the type
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), spec), out_specs=spec)(params, x)


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """Where a sequence is split: pipelined over ``axis``, rows over ``batch_axes``."""

    mesh: jax.sharding.Mesh
    axis: str
    batch_axes: tuple[str, ...] = ()
    micro_batches: int = 1


def fresh_memory(params: dict, x: jax.Array, *, config: MemoryConfig, split: ContextSplit | None = None):
    """The memory's output on a whole sequence ``x [b, l, d_model]`` from :func:`fresh_state`.

    One device (``split=None``), or exactly the same result pipelined over ``split``.
    """
    if split is None:
        return memory_layer(params, fresh_state(params, config, x.shape[0]), x, config=config)[0]
    return context_parallel_memory(params, x, config=config, mesh=split.mesh, axis_name=split.axis,
                                   micro_batches=split.micro_batches, batch_axes=split.batch_axes)
