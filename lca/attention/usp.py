"""USP (unified sequence parallelism): Ulysses inside a group, ring across groups.

The context is a 2D mesh ``ulysses_axis x ring_axis`` of ``U x R`` devices; the
sequence is split over both, ring-major: device ``(r, u)`` holds sub-shard ``u``
of ring shard ``r``. An ``all_to_all`` over the Ulysses axis gives each device
the whole ring shard ``r`` for ``h/U`` heads, ring attention over the ring axis
does the rest, and a last ``all_to_all`` returns sequence shards. The Ulysses
all-to-all runs over fast links (e.g. within a node) and the ring's ppermutes
over slow ones, and the head constraint is only ``num_heads % U == 0``.

The layout (zigzag by default) is the ring's: over ``R`` ring shards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from lca.attention import inputs
from lca.attention.impl import get_impl
from lca.attention.ring import bound_axis_size, ring_attention_shard, validate_global
from lca.attention.ulysses import check_heads, gather_seq, heads_to_seq, seq_to_heads
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard


def _usp(q, k, v, q_seg, kv_seg, *, ulysses_axis, ring_axis, layout, convert, q_positions=None,
         kv_positions=None, **ring_kwargs):
    """Ulysses all-to-all, (natural -> layout), ring, (layout -> natural), all-to-all back."""
    repeat = check_heads(q.shape[2], k.shape[2], bound_axis_size(ulysses_axis, arg="ulysses_axis"),
                         ulysses_axis)
    bound_axis_size(ring_axis, arg="ring_axis")
    q, k, v = (seq_to_heads(q, ulysses_axis), seq_to_heads(k, ulysses_axis, repeat),
               seq_to_heads(v, ulysses_axis, repeat))
    q_seg, kv_seg = gather_seq(q_seg, ulysses_axis), gather_seq(kv_seg, ulysses_axis)
    if q_positions is not None:
        q_positions = gather_seq(q_positions, ulysses_axis, 0)
    if kv_positions is not None:
        kv_positions = gather_seq(kv_positions, ulysses_axis, 0)
    to = functools.partial(layouts.shard_to_layout, layout=layout, axis_name=ring_axis)
    if convert:
        q, k, v, q_seg, kv_seg = jax.tree.map(to, (q, k, v, q_seg, kv_seg))
    out, lse = ring_attention_shard(
        q, k, v, axis_name=ring_axis, layout=layout, q_positions=q_positions,
        kv_positions=kv_positions, segment_ids=None if q_seg is None else (q_seg, kv_seg),
        return_lse=True, **ring_kwargs,
    )
    if convert:
        out = layouts.shard_from_layout(out, layout, ring_axis)
        lse = layouts.shard_from_layout(lse, layout, ring_axis, seq_axis=2)
    return heads_to_seq(out, ulysses_axis), heads_to_seq(lse, ulysses_axis, seq_axis=2, head_axis=1)


def usp_attention_shard(
    q, k, v, *, ulysses_axis: str, ring_axis: str, layout: str = "zigzag", q_positions=None,
    kv_positions=None, segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl: str = "blockwise",
    block_q: int | None = None, block_kv: int | None = None, return_lse: bool = False,
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
    b, q_len, kv_len, _, _, _ = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    out, lse = _usp(q, k, v, q_seg, kv_seg, ulysses_axis=ulysses_axis, ring_axis=ring_axis,
                    layout=layout, convert=False, q_positions=q_positions,
                    kv_positions=kv_positions, causal=causal, window=window, softcap=softcap,
                    scale=scale, impl=impl, block_q=block_q, block_kv=block_kv)
    return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Global:
    ulysses_axis: str
    ring_axis: str
    layout: str
    input_layout: str
    kwargs: tuple


def _global_shard(cfg: _Global, q, k, v, q_seg, kv_seg):
    return _usp(q, k, v, q_seg, kv_seg, ulysses_axis=cfg.ulysses_axis, ring_axis=cfg.ring_axis,
                layout=cfg.layout, convert=cfg.input_layout == "natural", **dict(cfg.kwargs))


def usp_attention(
    q, k, v, *, mesh, ulysses_axis: str, ring_axis: str, causal: bool = False,
    segment_ids=None, window: int | None = None, softcap: float | None = None,
    scale: float | None = None, layout: str = "zigzag", input_layout: str = "natural",
    impl: str = "blockwise", block_q: int | None = None, block_kv: int | None = None,
    return_lse: bool = False, batch_axes=None,
):
    """Exact attention with the sequence sharded over ``ring_axis x ulysses_axis``.

    Same arguments and return values as :func:`lca.attention.ring_attention`,
    with two context axes: ``num_heads`` must divide by ``mesh.shape[ulysses_axis]``,
    and the layout applies over the ``mesh.shape[ring_axis]`` ring shards (length a
    multiple of ``2 R U`` for zigzag). ``input_layout=layout`` means the data
    pipeline already applied ``lca.parallel.to_layout(x, layout, R)``.
    """
    b, _, _, h, h_kv, _ = inputs.check_qkv(q, k, v)
    u = seqshard.mesh_axis_size(mesh, ulysses_axis, arg="ulysses_axis")
    r = seqshard.mesh_axis_size(mesh, ring_axis, arg="ring_axis")
    if ulysses_axis == ring_axis:
        raise ValueError(
            f"ulysses_axis and ring_axis must be different mesh axes, both are {ring_axis!r}; "
            f"use ring_attention or ulysses_attention for one axis."
        )
    check_heads(h, h_kv, u, ulysses_axis)
    segs = validate_global(q, k, v, n=r, group=u, axis=ring_axis, layout=layout,
                           input_layout=input_layout, segment_ids=segment_ids, causal=causal,
                           window=window, softcap=softcap, scale=scale, impl=impl)
    cfg = _Global(ulysses_axis=ulysses_axis, ring_axis=ring_axis, layout=layout,
                  input_layout=input_layout, kwargs=tuple(sorted(dict(
                      causal=causal, window=window, softcap=softcap, scale=scale, impl=impl,
                      block_q=block_q, block_kv=block_kv).items())))
    seq_axes = (ring_axis, ulysses_axis)
    out, lse = seqshard.run(_global_shard, cfg, mesh, seq_axes,
                            seqshard.batch_axes(mesh, seq_axes, b, batch_axes),
                            q, k, v, *segs, check_vma=get_impl(impl).check_vma)
    out = seqshard.match_sharding(out, q, mesh)
    return (out, lse) if return_lse else out
