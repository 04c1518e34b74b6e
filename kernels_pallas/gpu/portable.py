"""Portable flash attention: the generic ``pl.pallas_call``/``BlockSpec`` API.

Lowers through Triton on any CUDA/ROCm GPU and runs on CPU with
``interpret=True`` (the CI path). Arrays keep lca's ``[b, len, heads, d]``
layout; all lengths are already padded to the blocks (see ``tiles``).

* forward, grid ``(nq, h, b)``: one query tile ``[bq, d]`` of one head; K/V of
  its KV head (``h // group`` in the index map, so GQA/MQA never copies K/V)
  stay in HBM and the kernel loads ``[bk, d]`` tiles only for key blocks in
  ``[kv_first[i], kv_last[i]]`` whose ``vis`` bit is set (``lax.cond``);
* dQ, grid ``(nq, h, b)``: same loop, accumulating ``ds @ k``;
* dK/dV, grid ``(nk, h_kv, b)``: one key tile; loops over the ``group`` query
  heads sharing it and over query blocks ``[q_first[j], q_last[j]]``, so each
  KV head's gradient is summed in registers (no per-query-head copies).

As in JAX's Triton example kernel (``jax.experimental.pallas.ops.gpu.attention``):

* the program's own block is the fastest grid axis (Triton's ``program_id(0)``,
  launched first), so the programs resident at once are neighbouring blocks of
  one head (then the heads of one KV group) and read the same K/V (dK/dV: the
  same Q/dO) from L2 instead of HBM;
* the softmax runs in base 2 (``block_math`` with ``base2=True``: ``exp2``, the
  scale and ``log2(e)`` folded into one multiply); ``lse`` stays natural-log at
  the interface, the backward converts it once;
* each loop over the other side's blocks is split around the run of blocks the
  program sees whole (``BlockPlan.kv_full_lo/hi``, ``q_full_lo/hi``): those skip
  the per-element mask, the blocks before and after it (window edge, causal
  diagonal, the partial last key block, zigzag holes) are masked exactly as
  before. With segment ids the plan is per batch row (``tiles.by_segments``): blocks
  of other documents are skipped like hidden ones, and the run seen whole holds
  blocks of the program's one document only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import block_math
from kernels_pallas import tiles
from kernels_pallas.tiles import BlockPlan, KernelGrid
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling
from lca.parallel.vma import varying_struct


def _params(interpret: bool, num_warps: int):
    return {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=2)}


def _key_valid(tiling: Tiling, start):
    """``[1, bk]`` bool: which keys of the tile starting at ``start`` are real (not padding)."""
    idx = start + lax.broadcasted_iota(jnp.int32, (1, tiling.block_kv), 1)
    return idx < tiling.kv_len


def _loop_blocks(lo, hi, body, carry, vis_of=None):
    """``carry = body(j, carry)`` for ``j`` in ``[lo, hi]`` (only where ``vis_of(j)`` is set, if given)."""

    def step(j, carry):
        if vis_of is None:
            return body(j, carry)
        return lax.cond(vis_of(j) != 0, lambda c: body(j, c), lambda c: c, carry)

    return lax.fori_loop(lo, hi + 1, step, carry)


class _PlanRefs(NamedTuple):
    """The block plan and token data as a kernel sees them (``first``/``last``/``full_*``: its own side's)."""

    q_pos: object
    kv_pos: object
    vis: object
    first: object
    last: object
    full_lo: object
    full_hi: object
    q_seg: object = None
    kv_seg: object = None

    def sweep(self, own, vis_of, masked, unmasked, carry, *, holes: bool):
        """``carry`` through every visible block of the other side for the program's block ``own``.

        ``masked(n, carry)`` / ``unmasked(n, carry)`` fold block ``n`` in with / without
        the per-element mask: the run the program sees whole goes through ``unmasked``,
        between a masked prefix and suffix. ``holes``: masked blocks whose ``vis_of(n)``
        is 0 are skipped.
        """
        first, last = self.first[own], self.last[own]
        skip = vis_of if holes else None
        lo, hi = self.full_lo[own], self.full_hi[own]
        carry = _loop_blocks(first, lo - 1, masked, carry, skip)
        carry = _loop_blocks(lo, hi, unmasked, carry)
        return _loop_blocks(hi + 1, last, masked, carry, skip)


class _Grid(KernelGrid):
    """Block specs of one portable kernel, grid ``(own blocks, heads, b)``, arrays ``[b, T, heads, d]``.

    A query-major program (forward, dQ; grid ``(nq, h, b)``) owns one query tile of
    one head and sees its KV head's keys whole. A key-major program (dK/dV; grid
    ``(nk, h_kv, b)``) owns one key tile of one KV head and sees the queries of
    its ``group`` query heads whole. Every spec below follows from that choice.
    The own-block axis comes first: it is Triton's fastest (see the module doc).
    """

    HEADS_AXIS = 2

    def shape(self, b: int, heads: int):
        """The grid: own blocks (fastest), then heads, then batch."""
        return (self.tiling.num_kv if self.key_major else self.tiling.num_q, heads, b)

    def _q_axis(self):
        """(block length, block index of a program) along the query axis."""
        if self.key_major:
            return self.tiling.q_padded, lambda g: 0
        return self.tiling.block_q, lambda g: g[0]

    def _kv_axis(self):
        if self.key_major:
            return self.tiling.block_kv, lambda g: g[0]
        return self.tiling.kv_padded, lambda g: 0

    @property
    def _heads(self):
        """Query heads per program: the whole group (key-major) or one, squeezed."""
        return self.group if self.key_major else None

    def queries(self):
        """``[b, Tq, h, d]`` arrays: q, dout, out."""
        size, idx = self._q_axis()
        return pl.BlockSpec((None, size, self._heads, self.head_dim),
                            lambda *g: (g[2], idx(g), g[1], 0))

    def keys(self):
        """``[b, Tk, h_kv, d]`` arrays: k, v, dk, dv."""
        size, idx = self._kv_axis()
        kv_head = (lambda g: g[1]) if self.key_major else (lambda g: g[1] // self.group)
        return pl.BlockSpec((None, size, None, self.head_dim),
                            lambda *g: (g[2], idx(g), kv_head(g), 0))

    def query_rows(self):
        """``[b, h, Tq]`` per-query statistics: lse, delta."""
        size, idx = self._q_axis()
        return pl.BlockSpec((None, self._heads, size), lambda *g: (g[2], g[1], idx(g)))

    def plan_inputs(self, plan: BlockPlan, q_seg, kv_seg):
        """``[(array, spec)]`` in :class:`_PlanRefs` order (segments only when given)."""
        (q_size, q_idx), (kv_size, kv_idx) = self._q_axis(), self._kv_axis()
        own = ((plan.q_first, plan.q_last, plan.q_full_lo, plan.q_full_hi) if self.key_major
               else (plan.kv_first, plan.kv_last, plan.kv_full_lo, plan.kv_full_hi))
        per_row = plan.vis.ndim == 3  # tiles.by_segments: one plan per batch row

        def whole(table):
            """The table whole, or with a plan per batch row, the program's row of it."""
            if per_row:
                return pl.BlockSpec((None,) + table.shape[1:], lambda *g: (g[2],) + (0,) * (table.ndim - 1))
            return pl.BlockSpec(table.shape, lambda *g: (0,) * table.ndim)

        inputs = [
            (plan.q_pos, pl.BlockSpec((q_size,), lambda *g: (q_idx(g),))),
            (plan.kv_pos, pl.BlockSpec((kv_size,), lambda *g: (kv_idx(g),))),
            (plan.vis, whole(plan.vis)),
            *[(table, whole(table)) for table in own],
        ]
        if q_seg is not None:
            inputs += [
                (q_seg, pl.BlockSpec((None, q_size), lambda *g: (g[2], q_idx(g)))),
                (kv_seg, pl.BlockSpec((None, kv_size), lambda *g: (g[2], kv_idx(g)))),
            ]
        return inputs


def _call(kernel, grid: _Grid, shape, tensors, plan_inputs, outputs, *, name, interpret, num_warps):
    """``pallas_call`` of ``kernel(*tensor_refs, plan: _PlanRefs, *out_refs)``.

    ``tensors``/``plan_inputs``: ``[(array, spec)]``; ``outputs``: ``[(shape struct, spec)]``.
    """
    n_in, n_plan = len(tensors), len(plan_inputs)

    def body(*refs):
        plan_refs = _PlanRefs(*refs[n_in:n_in + n_plan])
        kernel(*refs[:n_in], plan_refs, *refs[n_in + n_plan:])

    inputs = tensors + plan_inputs
    return pl.pallas_call(
        body,
        grid=shape,
        in_specs=[spec for _, spec in inputs],
        out_specs=[spec for _, spec in outputs],
        out_shape=[struct for struct, _ in outputs],
        interpret=interpret,
        name=name,
        **_params(interpret, num_warps),
    )(*[array for array, _ in inputs])


def _query_columns(p: _PlanRefs):
    """The program's query positions (and segments) as ``[bq, 1]`` columns."""
    return p.q_pos[...][:, None], (None if p.q_seg is None else p.q_seg[...][:, None])


def _row_plan(plan: BlockPlan, q_seg, kv_seg, tiling: Tiling) -> BlockPlan:
    """With segment ids, a plan per batch row (:func:`kernels_pallas.tiles.by_segments`): a
    packed row's blocks visit only their own documents' blocks, and skip the mask inside one."""
    return plan if q_seg is None else tiles.by_segments(plan, q_seg, kv_seg, tiling)


def _block_slice(block: int, n):
    """Rows of block ``n`` (``block`` long) of an array the program sees whole."""
    return pl.ds(pl.multiple_of(n * block, block), block)


def _key_tile(tiling: Tiling, mask: Mask, p: _PlanRefs, j, q_col, qs_col):
    """``(slice, ok [bq, bk])`` of key block ``j`` for a query-major program."""
    sl = _block_slice(tiling.block_kv, j)
    ks_row = None if p.kv_seg is None else p.kv_seg[sl][None, :]
    ok = block_math.visible(mask, q_col, p.kv_pos[sl][None, :], _key_valid(tiling, j * tiling.block_kv),
                            qs_col, ks_row)
    return sl, ok


def _key_sweep(tiling: Tiling, mask: Mask, p: _PlanRefs, fold, carry, *, segmented: bool):
    """A query-major program's loop over its key blocks: ``carry = fold(slice, ok, carry)``.

    ``ok`` is the tile's mask, or None inside the run of key blocks the query
    block sees whole (see :meth:`_PlanRefs.sweep`).
    """
    i = pl.program_id(0)
    q_col, qs_col = _query_columns(p)

    def masked(j, carry):
        sl, ok = _key_tile(tiling, mask, p, j, q_col, qs_col)
        return fold(sl, ok, carry)

    def unmasked(j, carry):
        return fold(_block_slice(tiling.block_kv, j), None, carry)

    return p.sweep(i, lambda j: p.vis[i, j], masked, unmasked, carry, holes=not mask.is_full or segmented)


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool, num_warps: int = 4):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    b, tq, h, d = q.shape
    grid = _Grid.of(tiling, q, k, key_major=False)
    plan = _row_plan(plan, q_seg, kv_seg, tiling)

    def kernel(q_ref, k_ref, v_ref, p: _PlanRefs, o_ref, lse_ref):
        q_tile = q_ref[...]

        def fold(sl, ok, carry):
            s, _ = block_math.logits(q_tile, k_ref[sl, :], logit, ok, base2=True)
            return block_math.online_softmax_step(*carry, s, v_ref[sl, :], base2=True)

        init = (
            jnp.full((tiling.block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((tiling.block_q, 1), jnp.float32),
            jnp.zeros((tiling.block_q, d), jnp.float32),
        )
        m, l, acc = _key_sweep(tiling, mask, p, fold, init, segmented=q_seg is not None)
        out, lse = block_math.finalize(m, l, acc, base2=True)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse[:, 0]

    return _call(
        kernel, grid, grid.shape(b, h),
        [(q, grid.queries()), (k, grid.keys()), (v, grid.keys())],
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(varying_struct((b, tq, h, d), out_dtype, q), grid.queries()),
         (varying_struct((b, h, tq), jnp.float32, q), grid.query_rows())],
        name="lca_flash_fwd_portable", interpret=interpret, num_warps=num_warps,
    )


def _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret, num_warps):
    grid = _Grid.of(tiling, q, k, key_major=False)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p: _PlanRefs, dq_ref):
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_col, delta_col = lse_ref[...][:, None], delta_ref[...][:, None]

        def fold(sl, ok, dq):
            k_tile = k_ref[sl, :]
            _, ds = block_math.probs_and_dlogits(
                q_tile, k_tile, v_ref[sl, :], do_tile, lse_col, delta_col, logit, ok, base2=True
            )
            return dq + block_math.dq_tile(ds, k_tile)

        dq_ref[...] = _key_sweep(tiling, mask, p, fold,
                                 jnp.zeros((tiling.block_q, grid.head_dim), jnp.float32),
                                 segmented=q_seg is not None)

    (dq,) = _call(
        kernel, grid, grid.shape(q.shape[0], q.shape[2]),
        grid.gradient_inputs(q, k, v, do, lse2, delta),
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(varying_struct(q.shape, jnp.float32, q), grid.queries())],
        name="lca_flash_dq_portable", interpret=interpret, num_warps=num_warps,
    )
    return dq


def _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret, num_warps):
    grid = _Grid.of(tiling, q, k, key_major=True)
    bq, bk = tiling.block_q, tiling.block_kv

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p: _PlanRefs, dk_ref, dv_ref):
        j = pl.program_id(0)
        k_tile, v_tile = k_ref[...], v_ref[...]
        kv_row = p.kv_pos[...][None, :]
        ks_row = None if p.kv_seg is None else p.kv_seg[...][None, :]
        valid = _key_valid(tiling, j * bk)

        def one_head(gi, carry):
            def fold(sl, ok, carry):
                dk, dv = carry
                q_tile, do_tile = q_ref[sl, gi, :], do_ref[sl, gi, :]
                prob, ds = block_math.probs_and_dlogits(
                    q_tile, k_tile, v_tile, do_tile,
                    lse_ref[gi, sl][:, None], delta_ref[gi, sl][:, None], logit, ok, base2=True,
                )
                dk_i, dv_i = block_math.dkv_tiles(prob, ds, q_tile, do_tile)
                return dk + dk_i, dv + dv_i

            def masked(i, carry):
                sl = _block_slice(bq, i)
                qs_col = None if p.q_seg is None else p.q_seg[sl][:, None]
                ok = block_math.visible(mask, p.q_pos[sl][:, None], kv_row, valid, qs_col, ks_row)
                return fold(sl, ok, carry)

            def unmasked(i, carry):
                return fold(_block_slice(bq, i), None, carry)

            return p.sweep(j, lambda i: p.vis[i, j], masked, unmasked, carry,
                           holes=not mask.is_full or q_seg is not None)

        zeros = jnp.zeros((bk, grid.head_dim), jnp.float32)
        dk_ref[...], dv_ref[...] = lax.fori_loop(0, grid.group, one_head, (zeros, zeros))

    grads = varying_struct(k.shape, jnp.float32, q)
    dk, dv = _call(
        kernel, grid, grid.shape(k.shape[0], k.shape[2]),
        grid.gradient_inputs(q, k, v, do, lse2, delta),
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(grads, grid.keys()), (grads, grid.keys())],
        name="lca_flash_dkdv_portable", interpret=interpret, num_warps=num_warps,
    )
    return dk, dv


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool, num_warps: int = 4):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (natural log; 0 on empty rows) and ``delta = rowsum(do * out) - dlse``
    are ``[b, h, Tq]``.
    """
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret, num_warps=num_warps)
    plan = _row_plan(plan, q_seg, kv_seg, tiling)
    lse2 = lse * block_math.LOG2E  # the kernels' softmax is in base 2
    dq = _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, **kw)
    dk, dv = _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, **kw)
    return dq, dk, dv
