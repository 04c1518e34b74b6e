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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import block_math
from kernels_pallas.tiles import BlockPlan, Tiling
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.parallel.vma import varying_struct


def _params(interpret: bool):
    return {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=2)}


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


def _spec(block, index_map):
    return pl.BlockSpec(block, index_map)


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    segmented = q_seg is not None

    def kernel(q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, vis_ref, first_ref, last_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if segmented else (None, None)
        o_ref, lse_ref = rest[-2:]
        i = pl.program_id(2)
        q_tile = q_ref[...]
        q_col = qpos_ref[...][:, None]
        qs_col = qseg_ref[...][:, None] if segmented else None

        def body(j, carry):
            start = j * bk
            sl = pl.ds(pl.multiple_of(start, bk), bk)
            ok = block_math.visible(
                mask, q_col, kvpos_ref[sl][None, :], _key_valid(tiling, start),
                qs_col, kvseg_ref[sl][None, :] if segmented else None,
            )
            s, _ = block_math.logits(q_tile, k_ref[sl, :], logit, ok)
            return block_math.online_softmax_step(*carry, s, v_ref[sl, :])

        init = (
            jnp.full((bq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32),
        )
        m, l, acc = _loop_blocks(
            first_ref[i], last_ref[i], lambda j: vis_ref[i, j], body, init, mask.is_full
        )
        out, lse = block_math.finalize(m, l, acc)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse[:, 0]

    in_specs = [
        _spec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
        _spec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // group, 0)),
        _spec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // group, 0)),
        _spec((bq,), lambda bi, hi, i: (i,)),
        _spec((tk,), lambda bi, hi, i: (0,)),
        _spec((nq, nk), lambda bi, hi, i: (0, 0)),
        _spec((nq,), lambda bi, hi, i: (0,)),
        _spec((nq,), lambda bi, hi, i: (0,)),
    ]
    args = [q, k, v, plan.q_pos, plan.kv_pos, plan.vis, plan.kv_first, plan.kv_last]
    if segmented:
        in_specs += [
            _spec((None, bq), lambda bi, hi, i: (bi, i)),
            _spec((None, tk), lambda bi, hi, i: (bi, 0)),
        ]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=[
            _spec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            _spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[
            varying_struct((b, tq, h, d), out_dtype, q),
            varying_struct((b, h, tq), jnp.float32, q),
        ],
        interpret=interpret,
        name="lca_flash_fwd_portable",
        **_params(interpret),
    )(*args)


def _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    segmented = q_seg is not None

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, vis_ref,
               first_ref, last_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if segmented else (None, None)
        dq_ref = rest[-1]
        i = pl.program_id(2)
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_col, delta_col = lse_ref[...][:, None], delta_ref[...][:, None]
        q_col = qpos_ref[...][:, None]
        qs_col = qseg_ref[...][:, None] if segmented else None

        def body(j, dq):
            start = j * bk
            sl = pl.ds(pl.multiple_of(start, bk), bk)
            ok = block_math.visible(
                mask, q_col, kvpos_ref[sl][None, :], _key_valid(tiling, start),
                qs_col, kvseg_ref[sl][None, :] if segmented else None,
            )
            k_tile = k_ref[sl, :]
            _, ds = block_math.probs_and_dlogits(
                q_tile, k_tile, v_ref[sl, :], do_tile, lse_col, delta_col, logit, ok
            )
            return dq + block_math.dq_tile(ds, k_tile)

        dq = _loop_blocks(
            first_ref[i], last_ref[i], lambda j: vis_ref[i, j], body,
            jnp.zeros((bq, d), jnp.float32), mask.is_full,
        )
        dq_ref[...] = dq

    row = lambda bi, hi, i: (bi, i, hi, 0)  # noqa: E731
    kv = lambda bi, hi, i: (bi, 0, hi // group, 0)  # noqa: E731
    in_specs = [
        _spec((None, bq, None, d), row),
        _spec((None, tk, None, d), kv),
        _spec((None, tk, None, d), kv),
        _spec((None, bq, None, d), row),
        _spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        _spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        _spec((bq,), lambda bi, hi, i: (i,)),
        _spec((tk,), lambda bi, hi, i: (0,)),
        _spec((nq, nk), lambda bi, hi, i: (0, 0)),
        _spec((nq,), lambda bi, hi, i: (0,)),
        _spec((nq,), lambda bi, hi, i: (0,)),
    ]
    args = [q, k, v, do, lse, delta, plan.q_pos, plan.kv_pos, plan.vis, plan.kv_first, plan.kv_last]
    if segmented:
        in_specs += [
            _spec((None, bq), lambda bi, hi, i: (bi, i)),
            _spec((None, tk), lambda bi, hi, i: (bi, 0)),
        ]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=_spec((None, bq, None, d), row),
        out_shape=varying_struct((b, tq, h, d), jnp.float32, q),
        interpret=interpret,
        name="lca_flash_dq_portable",
        **_params(interpret),
    )(*args)


def _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    segmented = q_seg is not None

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, vis_ref,
               first_ref, last_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if segmented else (None, None)
        dk_ref, dv_ref = rest[-2:]
        j = pl.program_id(2)
        k_tile, v_tile = k_ref[...], v_ref[...]
        kv_row = kvpos_ref[...][None, :]
        ks_row = kvseg_ref[...][None, :] if segmented else None
        valid = _key_valid(tiling, j * bk)

        def one_head(gi, carry):
            def body(i, carry):
                dk, dv = carry
                sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
                ok = block_math.visible(
                    mask, qpos_ref[sl][:, None], kv_row, valid,
                    qseg_ref[sl][:, None] if segmented else None, ks_row,
                )
                q_tile, do_tile = q_ref[sl, gi, :], do_ref[sl, gi, :]
                p, ds = block_math.probs_and_dlogits(
                    q_tile, k_tile, v_tile, do_tile,
                    lse_ref[gi, sl][:, None], delta_ref[gi, sl][:, None], logit, ok,
                )
                dk_i, dv_i = block_math.dkv_tiles(p, ds, q_tile, do_tile)
                return dk + dk_i, dv + dv_i

            return _loop_blocks(
                first_ref[j], last_ref[j], lambda i: vis_ref[i, j], body, carry, mask.is_full
            )

        zeros = jnp.zeros((bk, d), jnp.float32)
        dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
        dk_ref[...] = dk
        dv_ref[...] = dv

    key = lambda bi, hk, j: (bi, j, hk, 0)  # noqa: E731
    grp = lambda bi, hk, j: (bi, 0, hk, 0)  # noqa: E731
    in_specs = [
        _spec((None, tq, group, d), grp),
        _spec((None, bk, None, d), key),
        _spec((None, bk, None, d), key),
        _spec((None, tq, group, d), grp),
        _spec((None, group, tq), lambda bi, hk, j: (bi, hk, 0)),
        _spec((None, group, tq), lambda bi, hk, j: (bi, hk, 0)),
        _spec((tq,), lambda bi, hk, j: (0,)),
        _spec((bk,), lambda bi, hk, j: (j,)),
        _spec((nq, nk), lambda bi, hk, j: (0, 0)),
        _spec((nk,), lambda bi, hk, j: (0,)),
        _spec((nk,), lambda bi, hk, j: (0,)),
    ]
    args = [q, k, v, do, lse, delta, plan.q_pos, plan.kv_pos, plan.vis, plan.q_first, plan.q_last]
    if segmented:
        in_specs += [
            _spec((None, tq), lambda bi, hk, j: (bi, 0)),
            _spec((None, bk), lambda bi, hk, j: (bi, j)),
        ]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(b, h_kv, nk),
        in_specs=in_specs,
        out_specs=[_spec((None, bk, None, d), key), _spec((None, bk, None, d), key)],
        out_shape=[varying_struct((b, tk, h_kv, d), jnp.float32, q)] * 2,
        interpret=interpret,
        name="lca_flash_dkdv_portable",
        **_params(interpret),
    )(*args)


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    """
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret)
    dq = _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, **kw)
    dk, dv = _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, **kw)
    return dq, dk, dv

