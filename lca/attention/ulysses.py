"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: trade the sequence shard for a head shard.

With the sequence split over ``n`` devices, one ``all_to_all`` per tensor turns
``[b, T/n, h, d]`` shards into ``[b, T, h/n, d]`` (see
:mod:`lca.parallel.collectives`): every device then holds the whole sequence for
``h/n`` heads and runs ordinary local attention (``impl``), and one more
``all_to_all`` brings the output back to sequence shards. Communication per
device is O(T/n * h * d) and independent of the mask; memory holds the full
sequence for h/n heads.

``num_heads`` must be divisible by ``n``. With fewer kv heads than that
(GQA/MQA), each kv head is repeated the smallest number of times that lets the
kv heads split evenly, ``n / gcd(n, num_kv_heads)``, so every device receives
exactly the kv heads its query heads use.

Validation, the call spec and running over a mesh: :mod:`lca.attention.sharded`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from lca.attention import inputs, sharded
from lca.attention.sharded import CallSpec
from lca.attention.vjp import attention_vjp
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard
from lca.parallel.collectives import gather_seq, heads_to_seq, seq_to_heads

# The whole sequence on one device through the call's step implementation,
# differentiable by its backward: ``(spec, q, k, v, q_pos, kv_pos, q_seg, kv_seg)``.
_local_attention = attention_vjp(CallSpec.forward, CallSpec.backward)


def _ulysses_on_shards(spec: CallSpec, q, k, v, q_seg, kv_seg, *, axis_name, layout,
                       q_positions=None, kv_positions=None):
    """Head exchange, local attention over the whole sequence, exchange back: ``(out, lse)``."""
    n = sharded.bound_axis_size(axis_name)
    repeat = sharded.check_heads(q.shape[2], k.shape[2], n, axis_name)
    q_pos, kv_pos = _global_positions(layout, q_positions, kv_positions, q.shape[1], k.shape[1],
                                      n, axis_name)
    out, lse = _local_attention(
        spec, seq_to_heads(q, axis_name), seq_to_heads(k, axis_name, repeat),
        seq_to_heads(v, axis_name, repeat), q_pos, kv_pos,
        gather_seq(q_seg, axis_name), gather_seq(kv_seg, axis_name),
    )
    return heads_to_seq(out, axis_name), heads_to_seq(lse, axis_name, seq_axis=2, head_axis=1)


def _global_positions(layout, q_positions, kv_positions, q_len, kv_len, n, axis_name):
    """Positions of the gathered (layout-ordered) sequences ``[n * len]``."""
    if q_positions is not None or kv_positions is not None:
        q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
        given = (q_positions is not None, kv_positions is not None)
        if not all(given):
            raise ValueError(
                "pass both q_positions and kv_positions (local shard positions) or neither."
            )
        return gather_seq(q_pos, axis_name, 0), gather_seq(kv_pos, axis_name, 0)
    offset = (kv_len - q_len) * n  # bottom-right alignment of the global lengths
    return (jnp.asarray(layouts.permutation(layout, q_len * n, n) + offset),
            jnp.asarray(layouts.permutation(layout, kv_len * n, n)))


def _ulysses_body(spec: CallSpec, q, k, v, q_seg, kv_seg, *, axis_name, layout, convert):
    """Shard body of :func:`ulysses_attention` (see :mod:`lca.attention.sharded`)."""
    attend = functools.partial(_ulysses_on_shards, spec, axis_name=axis_name, layout=layout)
    return sharded.in_layout(attend, layout, axis_name, convert, q, k, v, q_seg, kv_seg)


def ulysses_attention_shard(
    q, k, v, *, axis_name: str, layout: str = "contiguous", q_positions=None,
    kv_positions=None, segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl="blockwise",
    block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False,
):
    """Ulysses attention on local shards, inside your own ``jax.shard_map``.

    Args:
      q: local ``[batch, q_len / n, num_heads, head_dim]``; k, v: local
        ``[batch, kv_len / n, num_kv_heads, head_dim]``, in ``layout`` order
        over the ``n`` devices of ``axis_name``; ``num_heads % n == 0``.
      layout: which global tokens the shards hold (default ``"contiguous"``);
        gives the positions unless ``q_positions``/``kv_positions`` (local
        ``[len / n]`` int32) are passed.
      segment_ids: local ``[batch, len / n]``, or a pair; others as in
        ``reference_attention``; impl/block sizes as in ring attention.

    Returns:
      local ``out [batch, q_len / n, num_heads, head_dim]`` (and ``lse
      [batch, num_heads, q_len / n]`` f32 with ``return_lse``).
    """
    spec, q_seg, kv_seg = sharded.validate_shard(
        q, k, v, segment_ids=segment_ids, causal=causal, window=window, softcap=softcap,
        scale=scale, impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    out, lse = _ulysses_on_shards(spec, q, k, v, q_seg, kv_seg, axis_name=axis_name,
                                  layout=layout, q_positions=q_positions,
                                  kv_positions=kv_positions)
    return (out, lse) if return_lse else out


def ulysses_attention(
    q, k, v, *, mesh, axis: str = "context", causal: bool = False, segment_ids=None,
    window: int | None = None, softcap: float | None = None, scale: float | None = None,
    layout: str = "contiguous", input_layout: str = "natural", impl="blockwise",
    block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False,
    batch_axes=None,
):
    """Exact attention with the sequence sharded over ``axis`` via head all-to-all.

    Same arguments and return values as :func:`lca.attention.ring_attention`
    (global arrays in, q's sharding out). ``num_heads`` must be divisible by
    ``mesh.shape[axis]``; kv heads are repeated as needed when there are fewer.
    ``layout`` only matters when the data already comes in a layout
    (``input_layout=layout``); contiguous costs no reordering.
    """
    _, _, _, h, h_kv, _ = inputs.check_qkv(q, k, v)
    n = seqshard.mesh_axis_size(mesh, axis)
    sharded.check_heads(h, h_kv, n, axis)
    spec, segs = sharded.validate_global(
        q, k, v, n=n, axis=axis, layout=layout, input_layout=input_layout,
        segment_ids=segment_ids, causal=causal, window=window, softcap=softcap, scale=scale,
        impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    return sharded.run_global(_ulysses_body, spec, q, k, v, segs, mesh=mesh, seq_axes=(axis,),
                              layout=layout, input_layout=input_layout,
                              axes=dict(axis_name=axis), batch_axes=batch_axes,
                              return_lse=return_lse)
