"""Portable flash attention: the generic ``pl.pallas_call``/``BlockSpec`` API.

Lowers through Triton on any CUDA/ROCm GPU and runs on CPU with
``interpret=True`` (the CI path). Arrays keep lca's ``[b, len, heads, d]``
layout; all lengths are already padded to the blocks (see ``tiles``).

* forward, grid ``(b, h, nq)``: one query tile ``[bq, d]`` of one head; K/V of
  its KV head (``h // group`` in the index map, so GQA/MQA never copies K/V)
  stay in HBM and the kernel loads ``[bk, d]`` tiles only for key blocks in
  ``[kv_first[i], kv_last[i]]`` whose ``vis`` bit is set (``lax.cond``);
* dQ, grid ``(b, h, nq)``: same loop, accumulating ``ds @ k``;
* dK/dV, grid ``(b, h_kv, nk)``: one key tile; loops over the ``group`` query
  heads sharing it and over query blocks ``[q_first[j], q_last[j]]``, so each
  KV head's gradient is summed in registers (no per-query-head copies).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import block_math
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


def _loop_blocks(lo, hi, vis_of, body, carry, always_visible: bool):
    """``carry = body(j, carry)`` for ``j`` in ``[lo, hi]`` whose ``vis_of(j)`` is set."""

    def step(j, carry):
        if always_visible:
            return body(j, carry)
        return lax.cond(vis_of(j) != 0, lambda c: body(j, c), lambda c: c, carry)

    return lax.fori_loop(lo, hi + 1, step, carry)


class _PlanRefs(NamedTuple):
    """The block plan and token data as a kernel sees them (``first``/``last``: its own side's)."""

    q_pos: object
    kv_pos: object
    vis: object
    first: object
    last: object
    q_seg: object = None
    kv_seg: object = None


class _Grid(KernelGrid):
    """Block specs of one portable kernel, grid ``(b, heads, own blocks)``, arrays ``[b, T, heads, d]``.

    A query-major program (forward, dQ; grid ``(b, h, nq)``) owns one query tile of
    one head and sees its KV head's keys whole. A key-major program (dK/dV; grid
    ``(b, h_kv, nk)``) owns one key tile of one KV head and sees the queries of
    its ``group`` query heads whole. Every spec below follows from that choice.
    """

    HEADS_AXIS = 2

    def _q_axis(self):
        """(block length, block index of a program) along the query axis."""
        if self.key_major:
            return self.tiling.q_padded, lambda g: 0
        return self.tiling.block_q, lambda g: g[2]

    def _kv_axis(self):
        if self.key_major:
            return self.tiling.block_kv, lambda g: g[2]
        return self.tiling.kv_padded, lambda g: 0

    @property
    def _heads(self):
        """Query heads per program: the whole group (key-major) or one, squeezed."""
        return self.group if self.key_major else None

    def queries(self):
        """``[b, Tq, h, d]`` arrays: q, dout, out."""
        size, idx = self._q_axis()
        return pl.BlockSpec((None, size, self._heads, self.head_dim),
                            lambda *g: (g[0], idx(g), g[1], 0))

    def keys(self):
        """``[b, Tk, h_kv, d]`` arrays: k, v, dk, dv."""
        size, idx = self._kv_axis()
        kv_head = (lambda g: g[1]) if self.key_major else (lambda g: g[1] // self.group)
        return pl.BlockSpec((None, size, None, self.head_dim),
                            lambda *g: (g[0], idx(g), kv_head(g), 0))

    def query_rows(self):
        """``[b, h, Tq]`` per-query statistics: lse, delta."""
        size, idx = self._q_axis()
        return pl.BlockSpec((None, self._heads, size), lambda *g: (g[0], g[1], idx(g)))

    def plan_inputs(self, plan: BlockPlan, q_seg, kv_seg):
        """``[(array, spec)]`` in :class:`_PlanRefs` order (segments only when given)."""
        (q_size, q_idx), (kv_size, kv_idx) = self._q_axis(), self._kv_axis()
        nq, nk = self.tiling.num_q, self.tiling.num_kv
        first, last = (plan.q_first, plan.q_last) if self.key_major else (plan.kv_first, plan.kv_last)
        whole = lambda shape: pl.BlockSpec(shape, lambda *g: (0,) * len(shape))  # noqa: E731
        inputs = [
            (plan.q_pos, pl.BlockSpec((q_size,), lambda *g: (q_idx(g),))),
            (plan.kv_pos, pl.BlockSpec((kv_size,), lambda *g: (kv_idx(g),))),
            (plan.vis, whole((nq, nk))),
            (first, whole(first.shape)),
            (last, whole(last.shape)),
        ]
        if q_seg is not None:
            inputs += [
                (q_seg, pl.BlockSpec((None, q_size), lambda *g: (g[0], q_idx(g)))),
                (kv_seg, pl.BlockSpec((None, kv_size), lambda *g: (g[0], kv_idx(g)))),
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


def _key_tile(tiling: Tiling, mask: Mask, p: _PlanRefs, j, q_col, qs_col):
    """``(slice, ok [bq, bk])`` of key block ``j`` for a query-major program."""
    start = j * tiling.block_kv
    sl = pl.ds(pl.multiple_of(start, tiling.block_kv), tiling.block_kv)
    ks_row = None if p.kv_seg is None else p.kv_seg[sl][None, :]
    ok = block_math.visible(mask, q_col, p.kv_pos[sl][None, :], _key_valid(tiling, start),
                            qs_col, ks_row)
    return sl, ok


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool, num_warps: int = 4):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    b, tq, h, d = q.shape
    grid = _Grid.of(tiling, q, k, key_major=False)

    def kernel(q_ref, k_ref, v_ref, p: _PlanRefs, o_ref, lse_ref):
        i = pl.program_id(2)
        q_tile = q_ref[...]
        q_col, qs_col = _query_columns(p)

        def body(j, carry):
            sl, ok = _key_tile(tiling, mask, p, j, q_col, qs_col)
            s, _ = block_math.logits(q_tile, k_ref[sl, :], logit, ok)
            return block_math.online_softmax_step(*carry, s, v_ref[sl, :])

        init = (
            jnp.full((tiling.block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((tiling.block_q, 1), jnp.float32),
            jnp.zeros((tiling.block_q, d), jnp.float32),
        )
        m, l, acc = _loop_blocks(p.first[i], p.last[i], lambda j: p.vis[i, j], body, init,
                                 mask.is_full)
        out, lse = block_math.finalize(m, l, acc)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse[:, 0]

    return _call(
        kernel, grid, (b, h, tiling.num_q),
        [(q, grid.queries()), (k, grid.keys()), (v, grid.keys())],
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(varying_struct((b, tq, h, d), out_dtype, q), grid.queries()),
         (varying_struct((b, h, tq), jnp.float32, q), grid.query_rows())],
        name="lca_flash_fwd_portable", interpret=interpret, num_warps=num_warps,
    )


def _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret, num_warps):
    grid = _Grid.of(tiling, q, k, key_major=False)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p: _PlanRefs, dq_ref):
        i = pl.program_id(2)
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_col, delta_col = lse_ref[...][:, None], delta_ref[...][:, None]
        q_col, qs_col = _query_columns(p)

        def body(j, dq):
            sl, ok = _key_tile(tiling, mask, p, j, q_col, qs_col)
            k_tile = k_ref[sl, :]
            _, ds = block_math.probs_and_dlogits(
                q_tile, k_tile, v_ref[sl, :], do_tile, lse_col, delta_col, logit, ok
            )
            return dq + block_math.dq_tile(ds, k_tile)

        dq_ref[...] = _loop_blocks(
            p.first[i], p.last[i], lambda j: p.vis[i, j], body,
            jnp.zeros((tiling.block_q, grid.head_dim), jnp.float32), mask.is_full,
        )

    (dq,) = _call(
        kernel, grid, (q.shape[0], q.shape[2], tiling.num_q),
        grid.gradient_inputs(q, k, v, do, lse, delta),
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(varying_struct(q.shape, jnp.float32, q), grid.queries())],
        name="lca_flash_dq_portable", interpret=interpret, num_warps=num_warps,
    )
    return dq


def _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret, num_warps):
    grid = _Grid.of(tiling, q, k, key_major=True)
    bq, bk = tiling.block_q, tiling.block_kv

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p: _PlanRefs, dk_ref, dv_ref):
        j = pl.program_id(2)
        k_tile, v_tile = k_ref[...], v_ref[...]
        kv_row = p.kv_pos[...][None, :]
        ks_row = None if p.kv_seg is None else p.kv_seg[...][None, :]
        valid = _key_valid(tiling, j * bk)

        def one_head(gi, carry):
            def body(i, carry):
                dk, dv = carry
                sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
                qs_col = None if p.q_seg is None else p.q_seg[sl][:, None]
                ok = block_math.visible(mask, p.q_pos[sl][:, None], kv_row, valid, qs_col, ks_row)
                q_tile, do_tile = q_ref[sl, gi, :], do_ref[sl, gi, :]
                prob, ds = block_math.probs_and_dlogits(
                    q_tile, k_tile, v_tile, do_tile,
                    lse_ref[gi, sl][:, None], delta_ref[gi, sl][:, None], logit, ok,
                )
                dk_i, dv_i = block_math.dkv_tiles(prob, ds, q_tile, do_tile)
                return dk + dk_i, dv + dv_i

            return _loop_blocks(p.first[j], p.last[j], lambda i: p.vis[i, j], body, carry,
                                mask.is_full)

        zeros = jnp.zeros((bk, grid.head_dim), jnp.float32)
        dk_ref[...], dv_ref[...] = lax.fori_loop(0, grid.group, one_head, (zeros, zeros))

    grads = varying_struct(k.shape, jnp.float32, q)
    dk, dv = _call(
        kernel, grid, (k.shape[0], k.shape[2], tiling.num_kv),
        grid.gradient_inputs(q, k, v, do, lse, delta),
        grid.plan_inputs(plan, q_seg, kv_seg),
        [(grads, grid.keys()), (grads, grid.keys())],
        name="lca_flash_dkdv_portable", interpret=interpret, num_warps=num_warps,
    )
    return dk, dv


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool, num_warps: int = 4):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    """
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret, num_warps=num_warps)
    dq = _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, **kw)
    dk, dv = _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, **kw)
    return dq, dk, dv

