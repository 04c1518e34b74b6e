"""The ``"mosaic_gpu"`` backward on Hopper: warp-specialised Mosaic GPU dQ and dK/dV kernels (FA-2 math, exp2).

Both kernels have the forward's shape (``kernels_pallas.gpu.hopper``): per program
three warpgroups (``thread_name="wg"``). Warpgroup 2 is the producer: it
TMA-copies the blocks its consumers need into ``STAGES`` SMEM slots, refilling a
slot once both consumers have freed it. Warpgroups 0 and 1 are the consumers:
each owns one block of its own, runs the ``wgmma`` and the elementwise math, and
takes the registers the producer gives up (``set_max_registers``). The two
consumers share every streamed block, so each is read from HBM once per two owned
blocks, and two warpgroups of math are on the SM.

* **dQ** (grid ``(n_pairs, h, b)``): consumer ``w`` owns query block ``2p + w``
  (Q, dO, lse, delta stay in SMEM); the producer streams the key blocks visible
  to either (K, V). Per key block ``s = Q K^T``, ``dp = dO V^T``,
  ``ds = p (dp - delta)``, ``dQ += ds K``.
* **dK/dV** (grid ``(n_pairs, h_kv, b)``): consumer ``w`` owns key block
  ``2p + w`` (K, V stay in SMEM); the producer streams, for every query head of
  the KV group, the query blocks visible to either (Q, dO, lse, delta). GQA sums
  over the group in registers, never through atomics. In the transposed
  orientation ``s^T = K Q^T``, ``dp^T = V dO^T``, ``dV += p^T dO``,
  ``dK += ds^T Q``, so ``P^T`` and ``dS^T`` are register A operands.

**Masks only where needed**, from the forward's schedule codes
(:func:`kernels_pallas.gpu.hopper.tile_codes`; dK/dV on their transpose): a
``HIDDEN`` block only keeps the barriers in step, an ``EDGE`` block is masked per
element, an ``INTERIOR`` one is not. A consumer runs its leading interior blocks
in a loop of their own; dK/dV lists query blocks last first, so that causal
attention's interior blocks (above the diagonal, seen from a key block) lead.

**Transposed operands.** On hardware ``K^T``, ``V^T`` (dQ) and ``Q^T``, ``dO^T``
(dK/dV) are ``plgpu.transpose_ref`` views of the plain SMEM tiles, as in JAX's
own Mosaic GPU attention. The interpret mode does not simulate transposed refs:
there the producer also copies pre-transposed tiles from HBM (:class:`kernels_pallas.gpu.hopper.TransposedViews`).
``P`` and ``dS`` are register A operands of wgmmas accumulating in place on
hardware, SMEM tiles in interpret mode (``kernels_pallas.gpu.hopper.accumulate``).

Math in the log2 domain (as the forward): ``p = exp2(s log2e - lse log2e)``
with the scale folded into the logit multiply; ``ds`` carries the softcap
derivative and the scale, so ``dq = ds k`` and ``dk = ds^T q`` in natural
units. Outputs are float32 through one SMEM tile that the consumers take in
turn. Compiled with ``approx_math``.

Not validated on hardware (no GPU since it was written): the interpret mode
(``tests/kernels/test_hopper.py``) checks the arithmetic and the barrier
protocol, lowering for CUDA checks layouts, TMA shapes and the transposed views;
see ``kernels_pallas.gpu.hopper`` for what the interpret mode does not simulate.
``head_dim`` 256 does not fit the SMEM (:func:`kernels_pallas.blocks.mosaic_gpu_backward_smem`):
:func:`backward` then runs the portable kernels.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import block_math
from kernels_pallas.blocks import MOSAIC_GPU_BWD_MAX_HEAD_DIM, MOSAIC_GPU_SMEM, mosaic_gpu_backward_smem
from kernels_pallas.blocks import MOSAIC_GPU_STAGES as STAGES
from kernels_pallas.gpu import portable
from kernels_pallas.gpu.hopper import (EDGE, HIDDEN, INTERIOR, Layouts, TransposedViews, accumulate, copy_in,
                                       kernel_options, load_schedule, log2_logits, matmul, pair_rows, schedule_pieces,
                                       tile_codes, tile_mask, tile_transforms)
from kernels_pallas.tiles import BlockPlan
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling, pad_axis
from lca.parallel.vma import varying_struct

__all__ = ["MAX_HEAD_DIM", "backward"]

MAX_HEAD_DIM = MOSAIC_GPU_BWD_MAX_HEAD_DIM  # at head_dim 256 the kernels' SMEM exceeds an SM's
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


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
        tanh = s2 * (1.0 / (logit.softcap * block_math.LOG2E))  # the capped logit over the cap
        ds = ds * (1.0 - tanh * tanh)
    return ds * logit.scale


class _Slots:
    """The ``STAGES`` SMEM slots between the producer and both consumers.

    ``copies`` TMA copies fill a slot, one "full" barrier each; a slot is free
    again once both consumers have arrived on its "free" barrier. Every consumer
    waits for and frees every step, hidden ones included, so the barriers'
    phases stay in step whatever each consumer computes.
    """

    def __init__(self, full, free, copies: int):
        self.full, self.free, self.copies = full, free, copies

    def fill(self, t, copies):
        """Producer: step ``t``'s ``[(gmem, smem)]`` copies, once its slot's previous use is freed."""
        slot = lax.rem(t, jnp.int32(STAGES))
        pl.when(t >= STAGES)(lambda: plgpu.barrier_wait(self.free.at[slot]))
        for n, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, self.full.at[slot * self.copies + n])

    def drain(self, steps):
        """Producer: observe the last frees too (a phase nobody awaits is a protocol error)."""
        def body(t, _):
            plgpu.barrier_wait(self.free.at[lax.rem(t, jnp.int32(STAGES))])

        lax.fori_loop(jnp.maximum(steps - STAGES, 0), steps, body, None)

    def wait(self, slot):
        for n in range(self.copies):
            plgpu.barrier_wait(self.full.at[slot * self.copies + n])

    def release(self, slot):
        plgpu.barrier_arrive(self.free.at[slot])


def _through_smem(interpret: bool, smem, *values):
    """Register A operands on hardware; the interpret mode has none, so there they go through ``smem``."""
    if not interpret:
        return values
    for n, value in enumerate(values):
        smem[n] = value
    plgpu.commit_smem()  # make the register->SMEM stores visible to wgmma
    return tuple(smem.at[n] for n in range(len(values)))


def _prologue(kernel: str, lists, tiling: Tiling, d: int, interpret: bool):
    """``(n_pairs, width, pieces, Layouts, TransposedViews)`` of a kernel, its SMEM checked."""
    n_pairs, width = lists.shape[1:]
    _check_smem(kernel, tiling.block_q, tiling.block_kv, d, width)
    return n_pairs, width, schedule_pieces(width), Layouts(interpret), TransposedViews(interpret)


def _check_smem(kernel: str, bq: int, bk: int, d: int, width: int):
    need = mosaic_gpu_backward_smem(bq, bk, d, 2, width)
    if need > MOSAIC_GPU_SMEM:
        raise ValueError(
            f"the mosaic_gpu {kernel} kernel needs {need} bytes of shared memory with block_q_bwd={bq}, "
            f"block_kv_bwd={bk}, head_dim={d} and {width} schedule entries per program "
            f"({MOSAIC_GPU_SMEM} available): use block_q_bwd=block_kv_bwd=64, or backend='gpu_portable'."
        )


def _roles(wg, schedule, produce, own, own_bars, consume):
    """The warp-specialised program: warpgroup 2 produces, warpgroups 0 and 1 consume.

    ``schedule``: :func:`kernels_pallas.gpu.hopper.load_schedule`'s refs; ``produce(count)`` streams the
    listed blocks; a consumer copies in ``own`` (its block's ``[(gmem, smem)]``,
    on ``own_bars`` from ``wg * len(own)``) and runs ``consume(count)``.
    """
    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        produce(load_schedule(*schedule, start=True))

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        copy_in(own, own_bars, wg * len(own))
        consume(load_schedule(*schedule, start=False))


def _consume(wg, count, code_smem, step, carry):
    """A consumer's loop over ``count`` listed blocks: the leading interior ones without a switch."""
    lead = code_smem[wg, 0]
    carry = lax.fori_loop(0, lead, lambda i, c: step(i, c, INTERIOR), carry)

    kinds = [functools.partial(step, kind=kind) for kind in (HIDDEN, EDGE, INTERIOR)]  # by code value
    return lax.fori_loop(lead, count, lambda i, c: lax.switch(code_smem[wg, 1 + i], kinds, i, c), carry)


def _in_turn(wg, out_free, store):
    """Consumer 0 stores through the one output tile first, then hands it to consumer 1."""
    pl.when(wg == 1)(lambda: plgpu.barrier_wait(out_free))
    store()
    pl.when(wg == 0)(lambda: plgpu.barrier_arrive(out_free))


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool, num_warps: int = 4):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (natural log, 0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    ``num_warps`` serves only the portable kernels above ``MAX_HEAD_DIM``.
    """
    if q.shape[-1] > MAX_HEAD_DIM:
        return portable.backward(q, k, v, do, lse, delta, plan, q_seg, kv_seg, tiling=tiling,
                                 mask=mask, logit=logit, interpret=interpret, num_warps=num_warps)
    code = tile_codes(plan, tiling, mask, q_seg, kv_seg)
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret)
    lse2 = lse * block_math.LOG2E
    dq = _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, pair_rows(code), **kw)
    dk, dv = _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg,
                   pair_rows(jnp.swapaxes(code, 1, 2), reverse=True), **kw)
    return dq[:, :q.shape[1]], dk[:, :k.shape[1]], dv[:, :k.shape[1]]


def _barriers(pieces, n_own: int, n_stream: int):
    """Schedule rows, the consumers' own blocks, the slots (full, free) and the output tile's turn."""
    return (plgpu.Barrier(num_barriers=3 * len(pieces)), plgpu.Barrier(num_barriers=2 * n_own),
            plgpu.Barrier(num_barriers=STAGES * n_stream), plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
            plgpu.Barrier())


def _launch(body, args: dict, out_type, grid, grid_names, smem, bars, interpret):
    """``plgpu.kernel`` with three warpgroups; ``body(refs: dict, outs, smem, bars)``."""
    names = list(args)

    def entry(*refs):
        ins, outs = dict(zip(names, refs)), refs[len(names):]
        pl.run_scoped(lambda smem_, bars_: body(ins, outs, smem_, bars_), smem, bars, collective_axes="wg")

    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=3,
                        thread_name="wg", **kernel_options(interpret))(*args.values())


def _dq(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, schedule, *, tiling, mask, logit, interpret):
    b, _, h, d = q.shape
    group = h // k.shape[2]
    bq, bk = tiling.block_q, tiling.block_kv
    segmented = q_seg is not None
    dtype = q.dtype
    lists, codes = schedule
    n_pairs, width, pieces, lay, ops = _prologue("dQ", lists, tiling, d, interpret)
    tq = 2 * n_pairs * bq  # an odd number of query blocks gets one all-hidden block
    args = dict(q=pad_axis(q, 1, tq), do=pad_axis(do, 1, tq), lse=pad_axis(lse2, 2, tq),
                delta=pad_axis(delta, 2, tq), k=k, v=v, q_pos=pad_axis(plan.q_pos, 0, tq, mode="edge"),
                kv_pos=plan.kv_pos, lists=lists, codes=codes)
    if segmented:
        args.update(q_seg=pad_axis(q_seg, 1, tq, mode="edge"), kv_seg=kv_seg)
    t_names = [f"{n}_t" for n in ("k", "v")] if interpret else []
    args.update(zip(t_names, ops.sources(k, v)))
    n_own = 6 if segmented else 5  # Q, dO, lse, delta, query positions (+ segments)
    n_stream = (4 if segmented else 3) + len(t_names)  # K, V, key positions (+ segments, K^T, V^T)

    def body(r, outs, smem, bars):
        (dq_ref,) = outs
        q_smem, do_smem, rows_smem, qtok_smem, k_smem, v_smem, kvtok_smem, t_smem, ds_smem, out_smem, \
            list_smem, code_smem = smem
        list_bar, own_bars, full_bars, free_bars, out_free = bars
        slots = _Slots(full_bars, free_bars, n_stream)
        wg = lax.axis_index("wg")
        pair, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        hk = lax.div(hi, jnp.int32(group))
        schedule_ = (r["lists"], r["codes"], pair, bi if segmented else 0, list_smem, code_smem, pieces, list_bar)

        rows = pl.ds((2 * pair + wg) * bq, bq)
        own = [(r["q"].at[bi, rows, hi], q_smem.at[wg]), (r["do"].at[bi, rows, hi], do_smem.at[wg]),
               (r["lse"].at[bi, hi, rows], rows_smem.at[wg, 0]), (r["delta"].at[bi, hi, rows], rows_smem.at[wg, 1]),
               (r["q_pos"].at[rows], qtok_smem.at[wg, 0])]
        if segmented:
            own.append((r["q_seg"].at[bi, rows], qtok_smem.at[wg, 1]))

        def produce(count):
            def fetch(t, _):
                slot = lax.rem(t, jnp.int32(STAGES))
                keys = pl.ds(list_smem[1 + t] * bk, bk)
                copies = [(r["k"].at[bi, keys, hk], k_smem.at[slot]), (r["v"].at[bi, keys, hk], v_smem.at[slot]),
                          (r["kv_pos"].at[keys], kvtok_smem.at[slot, 0])]
                if segmented:
                    copies.append((r["kv_seg"].at[bi, keys], kvtok_smem.at[slot, 1]))
                slots.fill(t, copies + ops.copies([r[n] for n in t_names], t_smem, slot, bi, hk, keys))

            lax.fori_loop(0, count, fetch, None)
            slots.drain(count)

        def consume(count):
            full = (bq, bk)
            lse_col = lax.broadcast_in_dim(lay.load(rows_smem.at[wg, 0], _ROW), full, [0])
            delta_col = lax.broadcast_in_dim(lay.load(rows_smem.at[wg, 1], _ROW), full, [0])

            def step(i, dq, kind):
                slot = lax.rem(i, jnp.int32(STAGES))
                slots.wait(slot)
                if kind != HIDDEN:
                    s2 = log2_logits(matmul(q_smem.at[wg], ops.t(k_smem.at[slot], t_smem, 0, slot), full), logit)
                    p = jnp.exp2(s2 - lse_col)
                    if kind == EDGE:
                        ok = tile_mask(lay, mask, full, qtok_smem.at[wg], kvtok_smem.at[slot], list_smem[1 + i] * bk,
                                       tiling.kv_len, segmented)
                        p = jnp.where(ok, p, 0.0)
                    dp = matmul(do_smem.at[wg], ops.t(v_smem.at[slot], t_smem, 1, slot), full)
                    (ds,) = _through_smem(interpret, ds_smem.at[wg] if interpret else None,
                                          _dlogits(s2, p, dp, delta_col, logit).astype(dtype))
                    dq = accumulate(dq, ds, k_smem.at[slot], interpret)
                slots.release(slot)
                return dq

            dq = _consume(wg, count, code_smem, step, lay.cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA))
            _in_turn(wg, out_free, lambda: _store(dq, out_smem, dq_ref.at[bi, rows, hi]))

        _roles(wg, schedule_, produce, own, own_bars, consume)

    tile = tile_transforms(dtype)
    smem = (
        plgpu.SMEM((2, bq, d), dtype, transforms=tile),  # per consumer: Q
        plgpu.SMEM((2, bq, d), dtype, transforms=tile),  # dO
        plgpu.SMEM((2, 2, bq), jnp.float32),  # lse (log2 units), delta
        plgpu.SMEM((2, 2, bq), jnp.int32),  # query positions, segments
        plgpu.SMEM((STAGES, bk, d), dtype, transforms=tile),  # per slot: K
        plgpu.SMEM((STAGES, bk, d), dtype, transforms=tile),  # V
        plgpu.SMEM((STAGES, 2, bk), jnp.int32),  # key positions, segments
        ops.smem(2, bk, d, dtype),  # K^T, V^T (interpret mode)
        plgpu.SMEM((2, 1, bq, bk), dtype, transforms=tile) if interpret else None,  # dS (interpret mode)
        plgpu.SMEM((bq, d), jnp.float32, transforms=tile_transforms(jnp.float32)),  # dQ, in turn
        plgpu.SMEM((width,), jnp.int32),
        plgpu.SMEM((2, width), jnp.int32),
    )
    return _launch(body, args, varying_struct((b, tq, h, d), jnp.float32, q), (n_pairs, h, b), ("q", "h", "b"),
                   smem, _barriers(pieces, n_own, n_stream), interpret)


def _dkdv(q, k, v, do, lse2, delta, plan, q_seg, kv_seg, schedule, *, tiling, mask, logit, interpret):
    b, _, h_kv, d = k.shape
    group = q.shape[2] // h_kv
    bq, bk = tiling.block_q, tiling.block_kv
    segmented = q_seg is not None
    dtype = q.dtype
    lists, codes = schedule
    n_pairs, width, pieces, lay, ops = _prologue("dK/dV", lists, tiling, d, interpret)
    tk = 2 * n_pairs * bk  # an odd number of key blocks gets one all-hidden block
    args = dict(q=q, do=do, lse=lse2, delta=delta, k=pad_axis(k, 1, tk), v=pad_axis(v, 1, tk), q_pos=plan.q_pos,
                kv_pos=pad_axis(plan.kv_pos, 0, tk, mode="edge"), lists=lists, codes=codes)
    if segmented:
        args.update(q_seg=q_seg, kv_seg=pad_axis(kv_seg, 1, tk, mode="edge"))
    t_names = [f"{n}_t" for n in ("q", "do")] if interpret else []
    args.update(zip(t_names, ops.sources(q, do)))
    n_own = 4 if segmented else 3  # K, V, key positions (+ segments)
    n_stream = (6 if segmented else 5) + len(t_names)  # Q, dO, lse, delta, query positions (+ segments, Q^T, dO^T)

    def body(r, outs, smem, bars):
        dk_ref, dv_ref = outs
        k_smem, v_smem, kvtok_smem, q_smem, do_smem, rows_smem, qtok_smem, t_smem, pds_smem, out_smem, \
            list_smem, code_smem = smem
        list_bar, own_bars, full_bars, free_bars, out_free = bars
        slots = _Slots(full_bars, free_bars, n_stream)
        wg = lax.axis_index("wg")
        pair, hk, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
        schedule_ = (r["lists"], r["codes"], pair, bi if segmented else 0, list_smem, code_smem, pieces, list_bar)

        keys = pl.ds((2 * pair + wg) * bk, bk)
        own = [(r["k"].at[bi, keys, hk], k_smem.at[wg]), (r["v"].at[bi, keys, hk], v_smem.at[wg]),
               (r["kv_pos"].at[keys], kvtok_smem.at[wg, 0])]
        if segmented:
            own.append((r["kv_seg"].at[bi, keys], kvtok_smem.at[wg, 1]))

        def produce(count):
            def fetch(t, _):
                # Step t: query head hk * group + t // count, its (t % count)-th listed query block.
                slot = lax.rem(t, jnp.int32(STAGES))
                head = hk * group + lax.div(t, count)
                rows = pl.ds(list_smem[1 + lax.rem(t, count)] * bq, bq)
                copies = [(r["q"].at[bi, rows, head], q_smem.at[slot]), (r["do"].at[bi, rows, head], do_smem.at[slot]),
                          (r["lse"].at[bi, head, rows], rows_smem.at[slot, 0]),
                          (r["delta"].at[bi, head, rows], rows_smem.at[slot, 1]),
                          (r["q_pos"].at[rows], qtok_smem.at[slot, 0])]
                if segmented:
                    copies.append((r["q_seg"].at[bi, rows], qtok_smem.at[slot, 1]))
                slots.fill(t, copies + ops.copies([r[n] for n in t_names], t_smem, slot, bi, head, rows))

            lax.fori_loop(0, count * group, fetch, None)
            slots.drain(count * group)

        def consume(count):
            full = (bk, bq)  # keys on rows, queries on columns

            def head_blocks(g, carry):
                def step(i, carry, kind):
                    slot = lax.rem(g * count + i, jnp.int32(STAGES))
                    slots.wait(slot)
                    if kind != HIDDEN:
                        dk, dv = carry
                        st2 = log2_logits(matmul(k_smem.at[wg], ops.t(q_smem.at[slot], t_smem, 0, slot), full), logit)
                        p = jnp.exp2(st2 - lax.broadcast_in_dim(lay.load(rows_smem.at[slot, 0], _COL), full, [1]))
                        if kind == EDGE:
                            ok = tile_mask(lay, mask, full, qtok_smem.at[slot], kvtok_smem.at[wg], (2 * pair + wg) * bk,
                                           tiling.kv_len, segmented, keys_on_rows=True)
                            p = jnp.where(ok, p, 0.0)
                        dpt = matmul(v_smem.at[wg], ops.t(do_smem.at[slot], t_smem, 1, slot), full)
                        delta_row = lax.broadcast_in_dim(lay.load(rows_smem.at[slot, 1], _COL), full, [1])
                        p16, ds = _through_smem(interpret, pds_smem.at[wg] if interpret else None, p.astype(dtype),
                                                _dlogits(st2, p, dpt, delta_row, logit).astype(dtype))
                        carry = (accumulate(dk, ds, q_smem.at[slot], interpret),
                                 accumulate(dv, p16, do_smem.at[slot], interpret))
                    slots.release(slot)
                    return carry

                return _consume(wg, count, code_smem, step, carry)

            zeros = lay.cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, group, head_blocks, (zeros, zeros))

            def store():
                _store(dk, out_smem, dk_ref.at[bi, keys, hk])
                _store(dv, out_smem, dv_ref.at[bi, keys, hk])

            _in_turn(wg, out_free, store)

        _roles(wg, schedule_, produce, own, own_bars, consume)

    tile = tile_transforms(dtype)
    smem = (
        plgpu.SMEM((2, bk, d), dtype, transforms=tile),  # per consumer: K
        plgpu.SMEM((2, bk, d), dtype, transforms=tile),  # V
        plgpu.SMEM((2, 2, bk), jnp.int32),  # key positions, segments
        plgpu.SMEM((STAGES, bq, d), dtype, transforms=tile),  # per slot: Q
        plgpu.SMEM((STAGES, bq, d), dtype, transforms=tile),  # dO
        plgpu.SMEM((STAGES, 2, bq), jnp.float32),  # lse (log2 units), delta
        plgpu.SMEM((STAGES, 2, bq), jnp.int32),  # query positions, segments
        ops.smem(2, bq, d, dtype),  # Q^T, dO^T (interpret mode)
        plgpu.SMEM((2, 2, bk, bq), dtype, transforms=tile) if interpret else None,  # P^T, dS^T (interpret mode)
        plgpu.SMEM((bk, d), jnp.float32, transforms=tile_transforms(jnp.float32)),  # dK then dV, in turn
        plgpu.SMEM((width,), jnp.int32),
        plgpu.SMEM((2, width), jnp.int32),
    )
    out = varying_struct((b, tk, h_kv, d), jnp.float32, q)
    return _launch(body, args, (out, out), (n_pairs, h_kv, b), ("kv", "h", "b"), smem,
                   _barriers(pieces, n_own, n_stream), interpret)
