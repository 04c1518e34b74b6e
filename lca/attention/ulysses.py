"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: trade the sequence shard for a head shard.

With the sequence split over ``n`` devices, one ``all_to_all`` per tensor turns
``[b, T/n, h, d]`` shards into ``[b, T, h/n, d]``: every device then holds the
whole sequence for ``h/n`` heads and runs ordinary local attention (``impl``),
and one more ``all_to_all`` brings the output back to sequence shards.
Communication per device is O(T/n * h * d) and independent of the mask;
memory holds the full sequence for h/n heads.

``num_heads`` must be divisible by ``n``. With fewer kv heads than that
(GQA/MQA), each kv head is repeated the smallest number of times that lets the
kv heads split evenly, ``n / gcd(n, num_kv_heads)``, so every device receives
exactly the kv heads its query heads use.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from lca.attention import inputs
from lca.attention.blockwise import BlockSizes
from lca.attention.impl import check_vma_support, get_impl
from lca.attention.inputs import LogitOptions
from lca.attention.mask import Mask
from lca.attention.ring import bound_axis_size, resolve_blocks, run_global
from lca.attention.vjp import attention_vjp
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard


@dataclasses.dataclass(frozen=True)
class LocalStatic:
    mask: Mask
    logit: LogitOptions
    impl: str
    blocks: BlockSizes | None


def _local_forward(st: LocalStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return get_impl(st.impl).forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                     mask=st.mask, logit=st.logit, blocks=st.blocks)


def _local_backward(st: LocalStatic, *args):
    return get_impl(st.impl).backward(*args, mask=st.mask, logit=st.logit, blocks=st.blocks)


# Attention through a registered local implementation, differentiable by its backward.
local_attention = attention_vjp(_local_forward, _local_backward)


def check_heads(num_heads: int, num_kv_heads: int, n: int, axis) -> int:
    """Validate the head split; return how often each kv head must be repeated."""
    if num_heads % n:
        working = [m for m in range(1, num_heads + 1) if num_heads % m == 0]
        raise ValueError(
            f"Ulysses attention splits the {num_heads} query heads over the {n} devices of mesh "
            f"axis {axis!r}, which needs num_heads % {n} == 0; axis sizes that work for "
            f"{num_heads} heads: {working} (or use ring attention, which has no head constraint)."
        )
    return n // math.gcd(n, num_kv_heads)


def seq_to_heads(x, axis_name, repeat: int = 1):
    """``[b, T/n, h, d]`` sequence shard -> ``[b, T, h/n, d]`` head shard (heads repeated first)."""
    if repeat > 1:
        x = jnp.repeat(x, repeat, axis=2)
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x, axis_name, *, seq_axis: int = 1, head_axis: int = 2):
    """Inverse of :func:`seq_to_heads` (``lse [b, h/n, T]``: ``seq_axis=2, head_axis=1``)."""
    return lax.all_to_all(x, axis_name, split_axis=seq_axis, concat_axis=head_axis, tiled=True)


def gather_seq(x, axis_name, seq_axis: int = 1):
    """All shards' positions / segment ids along the sequence (None stays None)."""
    if x is None:
        return None
    return lax.all_gather(x, axis_name, axis=seq_axis, tiled=True)


def ulysses_attention_shard(
    q, k, v, *, axis_name: str, layout: str = "contiguous", q_positions=None,
    kv_positions=None, segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl: str = "blockwise",
    block_q: int | None = None, block_kv: int | None = None, return_lse: bool = False,
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
    b, q_len, kv_len, h, h_kv, d = inputs.check_qkv(q, k, v)
    n = bound_axis_size(axis_name)
    repeat = check_heads(h, h_kv, n, axis_name)
    check_vma_support(impl, q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    q_pos, kv_pos = _global_positions(layout, q_positions, kv_positions, q_len, kv_len, n,
                                      axis_name)
    st = LocalStatic(
        mask=inputs.make_mask(causal, window),
        logit=inputs.logit_options(d, scale, softcap),
        impl=get_impl(impl).name,
        blocks=resolve_blocks(impl, block_q, block_kv),
    )
    out, lse = local_attention(
        st, seq_to_heads(q, axis_name), seq_to_heads(k, axis_name, repeat),
        seq_to_heads(v, axis_name, repeat), q_pos, kv_pos,
        gather_seq(q_seg, axis_name), gather_seq(kv_seg, axis_name),
    )
    out = heads_to_seq(out, axis_name)
    if not return_lse:
        return out
    return out, heads_to_seq(lse, axis_name, seq_axis=2, head_axis=1)


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


def ulysses_attention(
    q, k, v, *, mesh, axis: str = "context", causal: bool = False, segment_ids=None,
    window: int | None = None, softcap: float | None = None, scale: float | None = None,
    layout: str = "contiguous", input_layout: str = "natural", impl: str = "blockwise",
    block_q: int | None = None, block_kv: int | None = None, return_lse: bool = False,
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
    check_heads(h, h_kv, n, axis)
    return run_global(ulysses_attention_shard, q, k, v, mesh=mesh, axis=axis, causal=causal,
                      segment_ids=segment_ids, window=window, softcap=softcap, scale=scale,
                      layout=layout, input_layout=input_layout, impl=impl, block_q=block_q,
                      block_kv=block_kv, return_lse=return_lse, batch_axes=batch_axes)
