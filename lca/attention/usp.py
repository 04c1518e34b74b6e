"""USP (unified sequence parallelism): Ulysses inside a group, ring across groups.

The context is a 2D mesh ``ulysses_axis x ring_axis`` of ``U x R`` devices; the
sequence is split over both, ring-major: device ``(r, u)`` holds sub-shard ``u``
of ring shard ``r``. An ``all_to_all`` over the Ulysses axis
(:mod:`lca.parallel.collectives`) gives each device the whole ring shard ``r``
for ``h/U`` heads, the ring (:func:`lca.attention.ring.ring_on_shards`) over the
ring axis does the rest, and a last ``all_to_all`` returns sequence shards. The
Ulysses all-to-all runs over fast links (e.g. within a node) and the ring's
ppermutes over slow ones, and the head constraint is only ``num_heads % U == 0``.

The layout (zigzag by default) is the ring's: over ``R`` ring shards.
Validation, the call spec and running over a mesh: :mod:`lca.attention.sharded`.
"""

from __future__ import annotations

import functools

from lca.attention import inputs, sharded
from lca.attention.ring import ring_on_shards
from lca.attention.sharded import CallSpec
from lca.parallel import sequence_sharding as seqshard
from lca.parallel.collectives import gather_seq, heads_to_seq, seq_to_heads


def _usp_body(spec: CallSpec, q, k, v, q_seg, kv_seg, *, ulysses_axis, ring_axis, layout,
              convert, q_positions=None, kv_positions=None):
    """Ulysses all-to-all, (natural -> layout), ring, (layout -> natural), all-to-all back."""
    u = sharded.bound_axis_size(ulysses_axis, arg="ulysses_axis")
    repeat = sharded.check_heads(q.shape[2], k.shape[2], u, ulysses_axis)
    sharded.bound_axis_size(ring_axis, arg="ring_axis")
    q, k, v = (seq_to_heads(q, ulysses_axis), seq_to_heads(k, ulysses_axis, repeat),
               seq_to_heads(v, ulysses_axis, repeat))
    q_seg, kv_seg = gather_seq(q_seg, ulysses_axis), gather_seq(kv_seg, ulysses_axis)
    if q_positions is not None:
        q_positions = gather_seq(q_positions, ulysses_axis, 0)
    if kv_positions is not None:
        kv_positions = gather_seq(kv_positions, ulysses_axis, 0)
    ring = functools.partial(ring_on_shards, spec, axis_name=ring_axis, layout=layout,
                             q_positions=q_positions, kv_positions=kv_positions)
    out, lse = sharded.in_layout(ring, layout, ring_axis, convert, q, k, v, q_seg, kv_seg)
    return heads_to_seq(out, ulysses_axis), heads_to_seq(lse, ulysses_axis, seq_axis=2, head_axis=1)


def usp_attention_shard(
    q, k, v, *, ulysses_axis: str, ring_axis: str, layout: str = "zigzag", q_positions=None,
    kv_positions=None, segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl="blockwise",
    block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False,
):
    """USP on local shards, inside your own ``jax.shard_map`` over both axes.

    Args:
      q: local ``[batch, q_len / (R U), num_heads, head_dim]``; k, v likewise
        with ``num_kv_heads``. The sequence is split ring-major (spec
        ``P(batch, (ring_axis, ulysses_axis))``), and the ``R`` ring shards
        are in ``layout`` order. ``num_heads % U == 0``.
      q_positions, kv_positions: optional local ``[len / (R U)]`` global positions.
      Others as in :func:`lca.attention.ring_attention_shard`.

    Returns:
      local ``out`` like q (and ``lse [batch, num_heads, q_len / (R U)]``).
    """
    spec, q_seg, kv_seg = sharded.validate_shard(
        q, k, v, segment_ids=segment_ids, causal=causal, window=window, softcap=softcap,
        scale=scale, impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    out, lse = _usp_body(spec, q, k, v, q_seg, kv_seg, ulysses_axis=ulysses_axis,
                         ring_axis=ring_axis, layout=layout, convert=False,
                         q_positions=q_positions, kv_positions=kv_positions)
    return (out, lse) if return_lse else out


def usp_attention(
    q, k, v, *, mesh, ulysses_axis: str, ring_axis: str, causal: bool = False,
    segment_ids=None, window: int | None = None, softcap: float | None = None,
    scale: float | None = None, layout: str = "zigzag", input_layout: str = "natural",
    impl="blockwise", block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False, batch_axes=None,
):
    """Exact attention with the sequence sharded over ``ring_axis x ulysses_axis``.

    Same arguments and return values as :func:`lca.attention.ring_attention`,
    with two context axes: ``num_heads`` must divide by ``mesh.shape[ulysses_axis]``,
    and the layout applies over the ``mesh.shape[ring_axis]`` ring shards (length a
    multiple of ``2 R U`` for zigzag). ``input_layout=layout`` means the data
    pipeline already applied ``lca.parallel.to_layout(x, layout, R)``.
    """
    _, _, _, h, h_kv, _ = inputs.check_qkv(q, k, v)
    u = seqshard.mesh_axis_size(mesh, ulysses_axis, arg="ulysses_axis")
    r = seqshard.mesh_axis_size(mesh, ring_axis, arg="ring_axis")
    if ulysses_axis == ring_axis:
        raise ValueError(
            f"ulysses_axis and ring_axis must be different mesh axes, both are {ring_axis!r}; "
            f"use ring_attention or ulysses_attention for one axis."
        )
    sharded.check_heads(h, h_kv, u, ulysses_axis)
    spec, segs = sharded.validate_global(
        q, k, v, n=r, group=u, axis=ring_axis, layout=layout, input_layout=input_layout,
        segment_ids=segment_ids, causal=causal, window=window, softcap=softcap, scale=scale,
        impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    return sharded.run_global(_usp_body, spec, q, k, v, segs, mesh=mesh,
                              seq_axes=(ring_axis, ulysses_axis), layout=layout,
                              input_layout=input_layout,
                              axes=dict(ulysses_axis=ulysses_axis, ring_axis=ring_axis),
                              batch_axes=batch_axes, return_lse=return_lse)
