"""The block-skip plan of one kernel call, from per-block position ranges.

Kernels see arrays padded to whole blocks (:class:`lca.attention.tiling.Tiling`;
padded keys are masked by index, padded queries are dropped) and a :class:`BlockPlan` computed
here in plain JAX from the token positions:

* ``vis [nq, nk]`` int32: 1 where query block ``i`` may see key block ``j``
  (``Mask.block_visible`` on the blocks' position ranges; conservative for
  non-contiguous positions, exact for contiguous ones);
* ``kv_first/kv_last [nq]``: the first/last visible key block of each query
  block (``last < first`` when there is none), and ``q_first/q_last [nk]`` the
  same per key block for the dK/dV pass.

Kernels iterate only over ``[first, last]`` (so blocks outside it are neither
loaded nor computed) and skip blocks inside it whose ``vis`` is 0 (holes of
zigzag/striped layouts). With segment ids, :func:`by_segments` makes the plan
per batch row: blocks whose segment-id ranges do not meet are hidden too, so a
packed row's query block visits its own documents' key blocks only.

The plan also marks, per block, one run of the other side's blocks that it sees
*whole* (``kv_full_lo/hi``, ``q_full_lo/hi``): every query of the pair sees every
key (``Mask.block_full``, exact for any positions in the blocks' ranges) and no
key is padding, so a kernel may drop the per-element mask there and keep it only
for the blocks around the run (the causal diagonal, the window's edges, the last
partial key block). The run is the first one along the row; other full blocks
(a second zigzag run) are merely masked needlessly. Per batch row (:func:`by_segments`)
the run also needs one document on both sides, the same one.

Kernels that stream blocks through their own pipeline (the Mosaic GPU one)
use :func:`block_lists` instead: per query block, the count and the indices of
its visible key blocks, so holes are never even fetched.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lca.attention.mask import Mask, segment_ranges_meet, segment_ranges_one
from lca.attention.tiling import Tiling, pad_axis


class BlockPlan(NamedTuple):
    q_pos: jnp.ndarray  # [q_padded] int32 (edge padded)
    kv_pos: jnp.ndarray  # [kv_padded] int32 (edge padded)
    vis: jnp.ndarray  # [nq, nk] int32
    kv_first: jnp.ndarray  # [nq] int32
    kv_last: jnp.ndarray  # [nq] int32
    q_first: jnp.ndarray  # [nk] int32
    q_last: jnp.ndarray  # [nk] int32
    # The run of key blocks query block i sees whole is [kv_full_lo[i], kv_full_hi[i]],
    # inside [kv_first[i], kv_last[i]]; an empty run is (kv_last + 1, kv_last). Same per key block.
    kv_full_lo: jnp.ndarray  # [nq] int32
    kv_full_hi: jnp.ndarray  # [nq] int32
    q_full_lo: jnp.ndarray  # [nk] int32
    q_full_hi: jnp.ndarray  # [nk] int32


@dataclasses.dataclass(frozen=True)
class KernelGrid:
    """What a kernel's grid and block specs derive from (one subclass per kernel family).

    A query-major kernel (forward, dQ) gives each program one query tile; a
    key-major one (dK/dV) one key tile. Subclasses set ``HEADS_AXIS`` (their
    array layout) and build ``queries()``, ``keys()`` and ``query_rows()`` specs.
    """

    HEADS_AXIS: ClassVar[int]

    tiling: Tiling
    group: int  # query heads per KV head
    head_dim: int
    key_major: bool

    @classmethod
    def of(cls, tiling: Tiling, q, k, *, key_major: bool):
        """From ``q`` and ``k`` in the family's layout."""
        return cls(tiling, q.shape[cls.HEADS_AXIS] // k.shape[cls.HEADS_AXIS], q.shape[-1],
                   key_major)

    def gradient_inputs(self, q, k, v, do, lse, delta):
        """``[(array, spec)]`` of the tensors both backward kernels read."""
        return [(q, self.queries()), (k, self.keys()), (v, self.keys()), (do, self.queries()),
                (lse, self.query_rows()), (delta, self.query_rows())]


def _first_last(vis, axis: int):
    """First/last True index along ``axis``; ``(0, -1)`` where there is none."""
    n = vis.shape[axis]
    has = vis.any(axis=axis)
    first = jnp.argmax(vis, axis=axis)
    last = n - 1 - jnp.argmax(jnp.flip(vis, axis=axis), axis=axis)
    return (
        jnp.where(has, first, 0).astype(jnp.int32),
        jnp.where(has, last, -1).astype(jnp.int32),
    )


def _first_run(full, last, axis: int):
    """``(lo, hi)`` of the first run of True along ``axis``; ``(last + 1, last)`` where there is none."""
    n = full.shape[axis]
    idx = jnp.arange(n).reshape((-1, 1) if axis == 0 else (1, -1))
    has = full.any(axis=axis)
    lo = jnp.argmax(full, axis=axis)
    # The run ends before the first block after ``lo`` that is not full.
    gap = (idx > jnp.expand_dims(lo, axis)) & ~full
    hi = jnp.where(gap.any(axis=axis), jnp.argmax(gap, axis=axis), n) - 1
    return (jnp.where(has, lo, last + 1).astype(jnp.int32),
            jnp.where(has, hi, last).astype(jnp.int32))


def plan(q_pos, kv_pos, tiling: Tiling, mask: Mask) -> BlockPlan:
    """The block-skip plan of one call from ``q_pos [q_len]`` and ``kv_pos [kv_len]``."""
    q_blk = tiling.q_position_blocks(q_pos)
    kv_blk = tiling.kv_position_blocks(kv_pos)
    if mask.is_full:
        vis = jnp.ones((tiling.num_q, tiling.num_kv), bool)
    else:
        vis = mask.block_visible(
            q_blk.min(1)[:, None], q_blk.max(1)[:, None], kv_blk.min(1)[None], kv_blk.max(1)[None]
        )
        vis = jnp.broadcast_to(vis, (tiling.num_q, tiling.num_kv))
    kv_first, kv_last = _first_last(vis, axis=1)
    q_first, q_last = _first_last(vis, axis=0)
    bounds = (q_blk.min(1)[:, None], q_blk.max(1)[:, None], kv_blk.min(1)[None], kv_blk.max(1)[None])
    whole_keys = (jnp.arange(1, tiling.num_kv + 1) * tiling.block_kv <= tiling.kv_len)[None]
    full = jnp.broadcast_to(mask.block_full(*bounds) & whole_keys, vis.shape)
    return BlockPlan(q_blk.reshape(-1), kv_blk.reshape(-1), vis.astype(jnp.int32), kv_first, kv_last,
                     q_first, q_last, *_first_run(full, kv_last, axis=1), *_first_run(full, q_last, axis=0))


def segment_blocks(q_seg, kv_seg, tiling: Tiling):
    """``(meet, one_doc)``, bool ``[b, nq, nk]`` per batch row, from the (padded) segment ids.

    ``meet``: the blocks' id ranges overlap (else they share no id);
    ``one_doc``: both blocks hold one and the same id (see :mod:`lca.attention.mask`).
    """
    b = q_seg.shape[0]
    qs = q_seg.reshape(b, tiling.num_q, tiling.block_q)
    ks = kv_seg.reshape(b, tiling.num_kv, tiling.block_kv)
    ranges = (qs.min(2)[:, :, None], qs.max(2)[:, :, None], ks.min(2)[:, None], ks.max(2)[:, None])
    return segment_ranges_meet(*ranges), segment_ranges_one(*ranges)


def by_segments(plan_: BlockPlan, q_seg, kv_seg, tiling: Tiling) -> BlockPlan:
    """``plan_`` per batch row, narrowed by the (padded) segment ids ``[b, q_padded]``, ``[b, kv_padded]``.

    A block pair whose segment-id ranges do not meet in a row shares no id there
    (:func:`segment_blocks`; conservative): it leaves
    ``vis`` (now ``[b, nq, nk]``), and ``first``/``last`` (now ``[b, n]``) close in on
    the rest, in packed rows (ids growing along the row) the block's own documents.
    The run seen whole (``*_full_lo/hi``, ``[b, n]``) keeps, of the positions' run,
    the blocks holding one document on both sides, the same one. Positions stay as they are.
    """
    nq, nk = tiling.num_q, tiling.num_kv
    meet, one_doc = segment_blocks(q_seg, kv_seg, tiling)
    vis = (plan_.vis != 0)[None] & meet
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None]
    kv_run = (j >= plan_.kv_full_lo[:, None]) & (j <= plan_.kv_full_hi[:, None])
    q_run = (i >= plan_.q_full_lo[None]) & (i <= plan_.q_full_hi[None])

    def row(vis_r, one_doc_r):
        kv_first, kv_last = _first_last(vis_r, axis=1)
        q_first, q_last = _first_last(vis_r, axis=0)
        return (vis_r.astype(jnp.int32), kv_first, kv_last, q_first, q_last,
                *_first_run(kv_run & one_doc_r, kv_last, axis=1), *_first_run(q_run & one_doc_r, q_last, axis=0))

    return BlockPlan(plan_.q_pos, plan_.kv_pos, *jax.vmap(row)(vis, one_doc))


def pad_segments(q_seg, kv_seg, tiling: Tiling):
    """Pad ``[b, len]`` segment ids to the tiled lengths (None stays None)."""
    if q_seg is None:
        return None, None
    return (
        tiling.pad_q(q_seg.astype(jnp.int32), 1, mode="edge"),
        tiling.pad_kv(kv_seg.astype(jnp.int32), 1, mode="edge"),
    )


def block_lists(vis, align: int = 1):
    """Per row of ``vis [n, m]``: ``[count, j_0, ..., j_{count-1}, 0...]`` int32.

    The indices of the nonzero entries of each row, in order, after the count;
    rows are zero-padded to ``1 + m`` rounded up to ``align`` entries (a kernel
    that TMA-copies rows asks for whole copy granules). ``block_lists(plan.vis)`` serves query blocks,
    ``block_lists(plan.vis.T)`` key blocks.
    """
    n, m = vis.shape
    width = -(-(1 + m) // align) * align
    nonzero = vis != 0
    # A stable sort of the hidden flags moves the visible indices to the front in order.
    order = jnp.argsort(~nonzero, axis=1, stable=True).astype(jnp.int32)
    count = nonzero.sum(axis=1, dtype=jnp.int32)
    order = jnp.where(jnp.arange(m)[None, :] < count[:, None], order, 0)
    return pad_axis(jnp.concatenate([count[:, None], order], axis=1), 1, width)
