"""Tiling of one kernel call: padding, per-block position ranges and the block-skip plan.

Kernels see padded arrays (lengths rounded up to the blocks; padded keys are
masked by index, padded queries are dropped) and a :class:`BlockPlan` computed
here in plain JAX from the token positions:

* ``vis [nq, nk]`` int32: 1 where query block ``i`` may see key block ``j``
  (``Mask.block_visible`` on the blocks' position ranges; conservative for
  non-contiguous positions, exact for contiguous ones);
* ``kv_first/kv_last [nq]``: the first/last visible key block of each query
  block (``last < first`` when there is none), and ``q_first/q_last [nk]`` the
  same per key block for the dK/dV pass.

Kernels iterate only over ``[first, last]`` (so blocks outside it are neither
loaded nor computed) and skip blocks inside it whose ``vis`` is 0 (holes of
zigzag/striped layouts). Segment ids are not used for skipping.

Kernels that stream blocks through their own pipeline (the Mosaic GPU one)
use :func:`block_lists` instead: per query block, the count and the indices of
its visible key blocks, so holes are never even fetched.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

from kernels_pallas.blocks import FlashBlockSizes
from lca.attention.mask import Mask


def pad_axis(x, axis: int, size: int, mode: str = "constant"):
    """Pad ``x`` along ``axis`` up to ``size`` (``mode='edge'`` repeats the last value)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


@dataclasses.dataclass(frozen=True)
class Tiling:
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int

    @classmethod
    def of(cls, q_len: int, kv_len: int, blocks: FlashBlockSizes) -> "Tiling":
        return cls(q_len, kv_len, blocks.block_q, blocks.block_kv)

    @property
    def num_q(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def q_padded(self) -> int:
        return self.num_q * self.block_q

    @property
    def kv_padded(self) -> int:
        return self.num_kv * self.block_kv


class BlockPlan(NamedTuple):
    q_pos: jnp.ndarray  # [q_padded] int32 (edge padded)
    kv_pos: jnp.ndarray  # [kv_padded] int32 (edge padded)
    vis: jnp.ndarray  # [nq, nk] int32
    kv_first: jnp.ndarray  # [nq] int32
    kv_last: jnp.ndarray  # [nq] int32
    q_first: jnp.ndarray  # [nk] int32
    q_last: jnp.ndarray  # [nk] int32


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


def plan(q_pos, kv_pos, tiling: Tiling, mask: Mask) -> BlockPlan:
    """The block-skip plan of one call from ``q_pos [q_len]`` and ``kv_pos [kv_len]``."""
    q_pos = pad_axis(q_pos.astype(jnp.int32), 0, tiling.q_padded, mode="edge")
    kv_pos = pad_axis(kv_pos.astype(jnp.int32), 0, tiling.kv_padded, mode="edge")
    q_blk = q_pos.reshape(tiling.num_q, tiling.block_q)
    kv_blk = kv_pos.reshape(tiling.num_kv, tiling.block_kv)
    if mask.is_full:
        vis = jnp.ones((tiling.num_q, tiling.num_kv), bool)
    else:
        vis = mask.block_visible(
            q_blk.min(1)[:, None], q_blk.max(1)[:, None], kv_blk.min(1)[None], kv_blk.max(1)[None]
        )
        vis = jnp.broadcast_to(vis, (tiling.num_q, tiling.num_kv))
    kv_first, kv_last = _first_last(vis, axis=1)
    q_first, q_last = _first_last(vis, axis=0)
    return BlockPlan(q_pos, kv_pos, vis.astype(jnp.int32), kv_first, kv_last, q_first, q_last)


def pad_segments(q_seg, kv_seg, tiling: Tiling):
    """Pad ``[b, len]`` segment ids to the tiled lengths (None stays None)."""
    if q_seg is None:
        return None, None
    return (
        pad_axis(q_seg.astype(jnp.int32), 1, tiling.q_padded, mode="edge"),
        pad_axis(kv_seg.astype(jnp.int32), 1, tiling.kv_padded, mode="edge"),
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
