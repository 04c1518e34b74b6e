"""The ``"mosaic_gpu"`` backward on Hopper: Mosaic GPU dQ and dK/dV kernels (FlashAttention-2 math, exp2).

Two kernels, one warpgroup per program, each streaming the blocks it visits
through a ``STAGES``-deep TMA pipeline (the block lists of
:func:`kernels_pallas.tiles.block_lists`, so hidden blocks are never fetched):

* **dQ** (grid ``(nq, h, b)``): Q, dO, lse, delta of one query block stay in
  SMEM; per visible key block ``s = Q K^T``, ``dp = dO V^T``,
  ``ds = p (dp - delta)``, ``dQ += ds K``.
* **dK/dV** (grid ``(nk, h_kv, b)``): K and V of one key block stay in SMEM;
  the program visits every query head of its KV group (GQA sums in registers,
  never through atomics) and each visible query block, in the transposed
  orientation so every matmul's B operand is a plain SMEM tile:
  ``s^T = K Q^T``, ``dp^T = V dO^T``, ``dV += p^T dO``, ``dK += ds^T Q``.

Why the transposed copies (``K^T``, ``V^T``, ``Q^T``, ``dO^T`` are passed
pre-transposed from HBM): the Mosaic GPU interpret mode simulates neither
transposed SMEM refs nor register A operands. It costs SMEM and HBM reads;
``plgpu.transpose_ref`` would remove both once it can be validated. On hardware
``P`` and ``dS`` are the register A operands of wgmmas accumulating into dQ, dK and
dV in place (``kernels_pallas.gpu.hopper.accumulate``); the interpret mode puts them
through SMEM instead, and lowering for CUDA covers the compiled path. Compiled with
``approx_math``.

Math in the log2 domain (as the forward): ``p = exp2(s log2e - lse log2e)``
with the scale folded into the logit multiply; ``ds`` carries the softcap
derivative and the scale, so ``dq = ds k`` and ``dk = ds^T q`` in natural
units. Every visited tile is masked per element (the backward has no
interior/edge split yet). Outputs are float32 through one SMEM tile.

Not validated on hardware; see ``kernels_pallas.gpu.hopper`` for what the
interpret mode does and does not simulate. ``head_dim`` 256 does not fit the
dK/dV kernel's SMEM: :func:`backward` then runs the portable kernels.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import block_math
from kernels_pallas.blocks import MOSAIC_GPU_BWD_MAX_HEAD_DIM
from kernels_pallas.blocks import MOSAIC_GPU_STAGES as STAGES
from kernels_pallas.blocks import TMA_MAX_ELEMS
from kernels_pallas.gpu import portable
from kernels_pallas.gpu.hopper import Layouts, accumulate, kernel_options, log2_logits, matmul, tile_transforms
from kernels_pallas.tiles import BlockPlan, block_lists
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling
from lca.parallel.vma import varying_struct

__all__ = ["MAX_HEAD_DIM", "backward"]

MAX_HEAD_DIM = MOSAIC_GPU_BWD_MAX_HEAD_DIM  # at head_dim 256 the dK/dV kernel's SMEM exceeds an SM's
_LOG2E = math.log2(math.e)
_T = "b t h d -> b h d t"


def _pieces(width):
    return [pl.ds(s, min(TMA_MAX_ELEMS, width - s)) for s in range(0, width, TMA_MAX_ELEMS)]


def _start(copies, barrier, first=0):
    """Start the TMA copies ``[(gmem, smem)]``, copy ``n`` arriving on ``barrier.at[first + n]``."""
    for n, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, barrier.at[first + n])


def _copy_in(copies, barrier):
    """TMA-copy ``[(gmem, smem)]`` in flight together and wait for all."""
    _start(copies, barrier)
    for n in range(len(copies)):
        plgpu.barrier_wait(barrier.at[n])


def _prime(fetch, steps):
    """The pipeline's prologue: fetch the first ``STAGES`` of ``steps`` blocks."""
    for t in range(STAGES):
        pl.when(t < steps)(lambda t=t: fetch(jnp.int32(t)))


def _store(value, smem, dst):
    """Write a float32 register tile to HBM through ``smem`` (free again on return)."""
    smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)
    plgpu.wait_smem_to_gmem(0)


def _dlogits(s2, p, dp, delta, logit: LogitOptions):
    """``ds`` (natural units, scale and softcap derivative included) from log2-domain logits."""
    ds = p * (dp - delta)
    if logit.softcap is not None:
        tanh = s2 * (1.0 / (logit.softcap * _LOG2E))  # the capped logit over the cap
        ds = ds * (1.0 - tanh * tanh)
    return ds * logit.scale


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool, num_warps: int = 4):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (natural log, 0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    ``num_warps`` serves only the portable kernels above ``MAX_HEAD_DIM``.
    """
    if q.shape[-1] > MAX_HEAD_DIM:
        return portable.backward(q, k, v, do, lse, delta, plan, q_seg, kv_seg, tiling=tiling,
                                 mask=mask, logit=logit, interpret=interpret, num_warps=num_warps)
    lse2 = lse * _LOG2E
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret)
    dq = _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, **kw)
    dk, dv = _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, **kw)
    return dq, dk, dv


def _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, tq, h, d = q.shape
    group = h // k.shape[2]
    bq, bk, nq = tiling.block_q, tiling.block_kv, tiling.num_q
    segmented = q_seg is not None
    dtype = q.dtype
    lay = Layouts(interpret)
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    lists = block_lists(plan.vis, align=32)
    width = lists.shape[1]
    pieces = _pieces(width)
    n_kv = 5 if segmented else 4  # K^T, V^T, K, key positions (+ segments)

    def kernel(q_ref, do_ref, lse_ref, delta_ref, kt_ref, vt_ref, k_ref, qpos_ref, kvpos_ref, lists_ref,
               *rest):
        if segmented:
            qseg_ref, kvseg_ref, dq_ref, scratch = rest
        else:
            (dq_ref, scratch), qseg_ref, kvseg_ref = rest, None, None
        smem, bars = scratch
        q_smem, do_smem, rows_smem, kt_smem, vt_smem, k_smem, ds_smem, dq_smem, list_smem, qtok_smem, kvtok_smem = smem
        q_bar, kv_bars = bars
        i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        hk = lax.div(hi, jnp.int32(group))
        rows = pl.ds(i * bq, bq)
        copies = [(q_ref.at[bi, rows, hi], q_smem), (do_ref.at[bi, rows, hi], do_smem),
                  (lse_ref.at[bi, hi, rows], rows_smem.at[0]), (delta_ref.at[bi, hi, rows], rows_smem.at[1]),
                  (qpos_ref.at[rows], qtok_smem.at[0])]
        copies += [(lists_ref.at[i, piece], list_smem.at[piece]) for piece in pieces]
        if segmented:
            copies.append((qseg_ref.at[bi, rows], qtok_smem.at[1]))
        _copy_in(copies, q_bar)
        count = list_smem[0]

        def fetch(t):
            slot = lax.rem(t, jnp.int32(STAGES))
            keys = pl.ds(list_smem[1 + t] * bk, bk)
            kv = [(kt_ref.at[bi, hk, :, keys], kt_smem.at[slot]), (vt_ref.at[bi, hk, :, keys], vt_smem.at[slot]),
                  (k_ref.at[bi, keys, hk], k_smem.at[slot]), (kvpos_ref.at[keys], kvtok_smem.at[slot, 0])]
            if segmented:
                kv.append((kvseg_ref.at[bi, keys], kvtok_smem.at[slot, 1]))
            _start(kv, kv_bars, slot * 5)

        _prime(fetch, count)
        full = (bq, bk)
        lse_col = lax.broadcast_in_dim(lay.load(rows_smem.at[0], row_layout), full, [0])
        delta_col = lax.broadcast_in_dim(lay.load(rows_smem.at[1], row_layout), full, [0])

        def step(t, dq):
            slot = lax.rem(t, jnp.int32(STAGES))
            for n in range(n_kv):
                plgpu.barrier_wait(kv_bars.at[slot * 5 + n])
            s2 = log2_logits(matmul(q_smem, kt_smem.at[slot], full), logit)
            q_col = lax.broadcast_in_dim(lay.load(qtok_smem.at[0], row_layout), full, [0])
            kv_row = lax.broadcast_in_dim(lay.load(kvtok_smem.at[slot, 0], col_layout), full, [1])
            key_idx = list_smem[1 + t] * bk + lay.iota(full, 1)
            qs = ks = None
            if segmented:
                qs = lax.broadcast_in_dim(lay.load(qtok_smem.at[1], row_layout), full, [0])
                ks = lax.broadcast_in_dim(lay.load(kvtok_smem.at[slot, 1], col_layout), full, [1])
            ok = block_math.visible(mask, q_col, kv_row, key_idx < tiling.kv_len, qs, ks)
            p = jnp.where(ok, jnp.exp2(s2 - lse_col), 0.0)
            dp = matmul(do_smem, vt_smem.at[slot], full)
            ds = _dlogits(s2, p, dp, delta_col, logit).astype(dtype)
            if interpret:  # no register A operands there: dS through SMEM
                ds_smem[...] = ds
                plgpu.commit_smem()
                ds = ds_smem
            dq = accumulate(dq, ds, k_smem.at[slot], interpret)
            pl.when(t + STAGES < count)(lambda: fetch(t + STAGES))
            return dq

        dq = lax.fori_loop(0, count, step, lay.cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA))
        _store(dq, dq_smem, dq_ref.at[bi, rows, hi])

    def entry(*refs):
        tile = tile_transforms(dtype)
        smem = (
            plgpu.SMEM((bq, d), dtype, transforms=tile),
            plgpu.SMEM((bq, d), dtype, transforms=tile),
            plgpu.SMEM((2, bq), jnp.float32),  # lse (log2 units), delta
            plgpu.SMEM((STAGES, d, bk), dtype, transforms=tile),
            plgpu.SMEM((STAGES, d, bk), dtype, transforms=tile),
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=tile),
            plgpu.SMEM((bq, bk), dtype, transforms=tile) if interpret else None,  # dS (interpret mode)
            plgpu.SMEM((bq, d), jnp.float32, transforms=tile_transforms(jnp.float32)),
            plgpu.SMEM((width,), jnp.int32),
            plgpu.SMEM((2, bq), jnp.int32),
            plgpu.SMEM((STAGES, 2, bk), jnp.int32),
        )
        bars = (plgpu.Barrier(num_barriers=6 + len(pieces)), plgpu.Barrier(num_barriers=5 * STAGES))
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch), smem, bars)

    args = [q, do, lse2, delta, rearrange(k, _T), rearrange(v, _T), k, plan.q_pos, plan.kv_pos, lists]
    if segmented:
        args += [q_seg, kv_seg]
    return plgpu.kernel(
        entry, out_type=varying_struct((b, tq, h, d), jnp.float32, q), grid=(nq, h, b),
        grid_names=("q", "h", "b"), **kernel_options(interpret),
    )(*args)


def _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, tk, h_kv, d = k.shape
    h = q.shape[2]
    group = h // h_kv
    bq, bk, nk = tiling.block_q, tiling.block_kv, tiling.num_kv
    segmented = q_seg is not None
    dtype = q.dtype
    lay = Layouts(interpret)
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    lists = block_lists(plan.vis.T, align=32)
    width = lists.shape[1]
    pieces = _pieces(width)
    n_q = 8 if segmented else 7  # Q, Q^T, dO, dO^T, lse, delta, positions (+ segments)

    def kernel(q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, k_ref, v_ref, qpos_ref, kvpos_ref,
               lists_ref, *rest):
        if segmented:
            qseg_ref, kvseg_ref, dk_ref, dv_ref, scratch = rest
        else:
            (dk_ref, dv_ref, scratch), qseg_ref, kvseg_ref = rest, None, None
        smem, bars = scratch
        (k_smem, v_smem, kvtok_smem, q_smem, qt_smem, do_smem, dot_smem, rows_smem, qtok_smem, p_smem,
         ds_smem, out_smem, list_smem) = smem
        k_bar, q_bars = bars
        j, hk, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
        keys = pl.ds(j * bk, bk)
        copies = [(k_ref.at[bi, keys, hk], k_smem), (v_ref.at[bi, keys, hk], v_smem),
                  (kvpos_ref.at[keys], kvtok_smem.at[0])]
        copies += [(lists_ref.at[j, piece], list_smem.at[piece]) for piece in pieces]
        if segmented:
            copies.append((kvseg_ref.at[bi, keys], kvtok_smem.at[1]))
        _copy_in(copies, k_bar)
        count = list_smem[0]
        steps = count * group  # every query head of the KV group, each over the visible query blocks

        def fetch(t):
            slot = lax.rem(t, jnp.int32(STAGES))
            head = hk * group + lax.div(t, count)
            rows = pl.ds(list_smem[1 + lax.rem(t, count)] * bq, bq)
            qs = [(q_ref.at[bi, rows, head], q_smem.at[slot]), (qt_ref.at[bi, head, :, rows], qt_smem.at[slot]),
                  (do_ref.at[bi, rows, head], do_smem.at[slot]),
                  (dot_ref.at[bi, head, :, rows], dot_smem.at[slot]),
                  (lse_ref.at[bi, head, rows], rows_smem.at[slot, 0]),
                  (delta_ref.at[bi, head, rows], rows_smem.at[slot, 1]),
                  (qpos_ref.at[rows], qtok_smem.at[slot, 0])]
            if segmented:
                qs.append((qseg_ref.at[bi, rows], qtok_smem.at[slot, 1]))
            _start(qs, q_bars, slot * 8)

        _prime(fetch, steps)
        full = (bk, bq)  # keys on rows, queries on columns
        kv_col = lax.broadcast_in_dim(lay.load(kvtok_smem.at[0], row_layout), full, [0])
        key_idx = j * bk + lay.iota(full, 0)
        ks = lax.broadcast_in_dim(lay.load(kvtok_smem.at[1], row_layout), full, [0]) if segmented else None

        def step(t, carry):
            dk, dv = carry
            slot = lax.rem(t, jnp.int32(STAGES))
            for n in range(n_q):
                plgpu.barrier_wait(q_bars.at[slot * 8 + n])
            s2 = log2_logits(matmul(k_smem, qt_smem.at[slot], full), logit)
            q_row = lax.broadcast_in_dim(lay.load(qtok_smem.at[slot, 0], col_layout), full, [1])
            qs = (lax.broadcast_in_dim(lay.load(qtok_smem.at[slot, 1], col_layout), full, [1])
                  if segmented else None)
            ok = block_math.visible(mask, q_row, kv_col, key_idx < tiling.kv_len, qs, ks)
            lse_row = lax.broadcast_in_dim(lay.load(rows_smem.at[slot, 0], col_layout), full, [1])
            delta_row = lax.broadcast_in_dim(lay.load(rows_smem.at[slot, 1], col_layout), full, [1])
            p = jnp.where(ok, jnp.exp2(s2 - lse_row), 0.0)
            dp = matmul(v_smem, dot_smem.at[slot], full)
            p16, ds = p.astype(dtype), _dlogits(s2, p, dp, delta_row, logit).astype(dtype)
            if interpret:  # no register A operands there: P and dS through SMEM
                p_smem[...] = p16
                ds_smem[...] = ds
                plgpu.commit_smem()
                p16, ds = p_smem, ds_smem
            dv = accumulate(dv, p16, do_smem.at[slot], interpret)
            dk = accumulate(dk, ds, q_smem.at[slot], interpret)
            pl.when(t + STAGES < steps)(lambda: fetch(t + STAGES))
            return dk, dv

        zeros = lay.cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, steps, step, (zeros, zeros))
        _store(dk, out_smem, dk_ref.at[bi, keys, hk])  # one float32 tile, used in turn
        _store(dv, out_smem, dv_ref.at[bi, keys, hk])

    def entry(*refs):
        tile = tile_transforms(dtype)
        smem = (
            plgpu.SMEM((bk, d), dtype, transforms=tile),
            plgpu.SMEM((bk, d), dtype, transforms=tile),
            plgpu.SMEM((2, bk), jnp.int32),  # key positions, segments
            plgpu.SMEM((STAGES, bq, d), dtype, transforms=tile),
            plgpu.SMEM((STAGES, d, bq), dtype, transforms=tile),
            plgpu.SMEM((STAGES, bq, d), dtype, transforms=tile),
            plgpu.SMEM((STAGES, d, bq), dtype, transforms=tile),
            plgpu.SMEM((STAGES, 2, bq), jnp.float32),  # lse (log2 units), delta
            plgpu.SMEM((STAGES, 2, bq), jnp.int32),  # query positions, segments
            plgpu.SMEM((bk, bq), dtype, transforms=tile) if interpret else None,  # P (interpret mode)
            plgpu.SMEM((bk, bq), dtype, transforms=tile) if interpret else None,  # dS (interpret mode)
            plgpu.SMEM((bk, d), jnp.float32, transforms=tile_transforms(jnp.float32)),
            plgpu.SMEM((width,), jnp.int32),
        )
        bars = (plgpu.Barrier(num_barriers=4 + len(pieces)), plgpu.Barrier(num_barriers=8 * STAGES))
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch), smem, bars)

    args = [q, rearrange(q, _T), do, rearrange(do, _T), lse2, delta, k, v, plan.q_pos, plan.kv_pos, lists]
    if segmented:
        args += [q_seg, kv_seg]
    out = varying_struct((b, tk, h_kv, d), jnp.float32, q)
    return plgpu.kernel(
        entry, out_type=(out, out), grid=(nk, h_kv, b), grid_names=("kv", "h", "b"),
        **kernel_options(interpret),
    )(*args)
