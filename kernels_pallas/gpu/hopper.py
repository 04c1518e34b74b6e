"""The ``"mosaic_gpu"`` backend (H100/H200, sm_90): a Mosaic GPU flash forward.

What runs where (precisely):

* **forward**: the Mosaic GPU kernel in this module (:func:`forward`): TMA
  copies into swizzled SMEM, ``wgmma`` for ``Q K^T`` and ``P V``, online
  softmax in registers, a ``STAGES``-deep TMA pipeline over key blocks.
* **backward** (dQ, dK/dV): the portable Pallas kernels
  (``kernels_pallas.gpu.portable.backward``, Triton on GPU). No Mosaic GPU
  backward is written yet; :func:`backward` is that function, re-exported.

Validation: the forward is tested on CPU under the Mosaic GPU interpret mode
(``InterpretGPUParams``, ``tests/kernels/test_hopper.py``) and its lowering to
a Mosaic GPU module is checked on CPU (``lowering_platforms=("cuda",)``). It
has NOT been run on an H100/H200; that is why ``backend="auto"`` does not pick
it (see ``kernels_pallas.api``) and it is an explicit opt-in
(``backend="mosaic_gpu"``) until ``tests/kernels/test_gpu.py`` passes there.

Kernel (one warpgroup per program, grid ``(nq, h, b)``):

* Q tile ``[bq, d]`` of query block ``i`` of head ``h`` is TMA-copied to SMEM once.
* Key blocks come from ``tiles.block_lists(plan.vis)``: query block ``i``
  visits exactly its visible key blocks (causal/window ranges and zigzag holes
  are neither fetched nor computed). The KV head is ``h // group`` in the TMA
  source slice, so GQA/MQA never copies K/V.
* K is passed pre-transposed (``[b, h_kv, d, Tk]``) so both wgmma B operands
  are plain SMEM tiles (``K^T [d, bk]`` and ``V [bk, d]``); ``P`` goes through
  SMEM as the A operand of ``P V``. This keeps the kernel inside what the
  interpret mode simulates (no transposed refs, no register A operands, no
  accumulator initialisation via ``run_state``), so the tested code is the
  code that would run on hardware. Each matmul accumulates into a fresh
  ``plgpu.ACC`` and is folded into the running accumulator in registers.
* Masking is :func:`kernels_pallas.block_math.visible` on the tile's positions,
  segment ids and key validity (padding), exactly the lca ``Mask`` rule.

Alignment (checked in ``kernels_pallas.blocks``): ``block_q`` a multiple of 64
(wgmma M per warpgroup), ``block_kv`` a multiple of 64, both at most 256
(one TMA copy per Q/K/V tile and position row), ``head_dim`` a multiple of 64
up to 256; on hardware the inputs must be bfloat16/float16. The key-block list
of a query block (one entry per key block, 2048 at 128k keys with 64-key
blocks) is copied in pieces of at most 256 entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import block_math
from kernels_pallas.blocks import MOSAIC_GPU_STAGES as STAGES
from kernels_pallas.blocks import TMA_MAX_ELEMS
from kernels_pallas.gpu.portable import backward
from kernels_pallas.tiles import BlockPlan, block_lists
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling
from lca.parallel.vma import varying_struct

__all__ = ["STAGES", "backward", "forward"]

_SWIZZLE = 128  # bytes


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    # jax 0.10.2 has no public alias for the Mosaic GPU interpret params (the TPU
    # ones are ``pltpu.InterpretParams``); passing them to ``plgpu.kernel`` runs
    # the kernel on CPU with simulated SMEM, TMA, barriers and wgmma.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _tile_transforms(dtype):
    """Swizzled SMEM tiling that wgmma and TMA expect for 2-D operand tiles."""
    return (
        plgpu.TilingTransform((8, _SWIZZLE // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(_SWIZZLE),
    )


class _Layouts:
    """Register-layout hints; identity under the interpret mode, which has no layouts.

    ``layout_cast`` and ``plgpu.load`` only tell the Mosaic GPU compiler how a
    value is distributed over threads; the values are the same either way.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def iota(self, shape, dim):
        return self.cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)


def _matmul(a_smem, b_smem, shape):
    """``a @ b`` of two SMEM tiles into a fresh wgmma accumulator, as an f32 value."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    b, tq, h, d = q.shape
    h_kv = k.shape[2]
    group = h // h_kv
    bq, bk, nq = tiling.block_q, tiling.block_kv, tiling.num_q
    segmented = q_seg is not None
    dtype = q.dtype
    lay = _Layouts(interpret)
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per query row
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per key column
    # [nq, width]: count, then the visible key blocks; rows of 128 bytes (TMA granule).
    kv_lists = block_lists(plan.vis, align=32)
    width = kv_lists.shape[1]
    # A TMA copy moves at most TMA_MAX_ELEMS per dimension: the list row goes in pieces
    # (128-byte aligned: 256 int32s is a multiple of 32).
    list_pieces = [pl.ds(start, min(TMA_MAX_ELEMS, width - start)) for start in range(0, width, TMA_MAX_ELEMS)]
    num_q_copies = 2 + len(list_pieces) + segmented

    def kernel(q_ref, kt_ref, v_ref, qpos_ref, kvpos_ref, lists_ref, *rest):
        if segmented:
            qseg_ref, kvseg_ref, o_ref, lse_ref, scratch = rest
        else:
            (o_ref, lse_ref, scratch), qseg_ref, kvseg_ref = rest, None, None
        smem, bars = scratch
        q_smem, kt_smem, v_smem, p_smem, o_smem, lse_smem, list_smem, qtok_smem, kvtok_smem = smem
        q_bar, kv_bars = bars
        i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        hk = lax.div(hi, jnp.int32(group))
        rows = pl.ds(i * bq, bq)

        # Per-program inputs: the Q tile, its positions/segments, its key-block list.
        q_copies = [(q_ref.at[bi, rows, hi], q_smem), (qpos_ref.at[rows], qtok_smem.at[0])]
        q_copies += [(lists_ref.at[i, piece], list_smem.at[piece]) for piece in list_pieces]
        if segmented:
            q_copies.append((qseg_ref.at[bi, rows], qtok_smem.at[1]))
        for n, (src, dst) in enumerate(q_copies):
            plgpu.copy_gmem_to_smem(src, dst, q_bar.at[n])
        for n in range(len(q_copies)):
            plgpu.barrier_wait(q_bar.at[n])
        count = list_smem[0]

        def fetch(t):
            """Start the TMA copies of the ``t``-th visible key block into slot ``t % STAGES``."""
            slot = lax.rem(t, jnp.int32(STAGES))
            keys = pl.ds(list_smem[1 + t] * bk, bk)
            copies = [(kt_ref.at[bi, hk, :, keys], kt_smem.at[slot]),
                      (v_ref.at[bi, keys, hk], v_smem.at[slot]),
                      (kvpos_ref.at[keys], kvtok_smem.at[slot, 0])]
            if segmented:
                copies.append((kvseg_ref.at[bi, keys], kvtok_smem.at[slot, 1]))
            for n, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[slot * 4 + n])

        for t in range(STAGES):  # pipeline prologue
            pl.when(t < count)(lambda t=t: fetch(jnp.int32(t)))

        def tile_mask(t, slot):
            """``[bq, bk]`` visibility of the tile: positions, segments, key padding."""
            full = (bq, bk)
            q_col = lax.broadcast_in_dim(lay.load(qtok_smem.at[0], row_layout), full, [0])
            kv_row = lax.broadcast_in_dim(lay.load(kvtok_smem.at[slot, 0], col_layout), full, [1])
            key_idx = list_smem[1 + t] * bk + lay.iota(full, 1)
            qs = ks = None
            if segmented:
                qs = lax.broadcast_in_dim(lay.load(qtok_smem.at[1], row_layout), full, [0])
                ks = lax.broadcast_in_dim(lay.load(kvtok_smem.at[slot, 1], col_layout), full, [1])
            return block_math.visible(mask, q_col, kv_row, key_idx < tiling.kv_len, qs, ks)

        def step(t, carry):
            m, l, acc = carry
            slot = lax.rem(t, jnp.int32(STAGES))
            for n in range(4 if segmented else 3):
                plgpu.barrier_wait(kv_bars.at[slot * 4 + n])
            s = logit.apply(_matmul(q_smem, kt_smem.at[slot], (bq, bk)))
            s = jnp.where(tile_mask(t, slot), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet
            p = jnp.exp(s - lax.broadcast_in_dim(m_safe, (bq, bk), [0]))
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(axis=1)
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # make the register->SMEM stores visible to wgmma
            pv = _matmul(p_smem, v_smem.at[slot], (bq, d))
            acc = acc * lax.broadcast_in_dim(alpha, (bq, d), [0]) + pv
            # The slot is free again (both wgmmas were awaited): refill it.
            pl.when(t + STAGES < count)(lambda: fetch(t + STAGES))
            return m_new, l, acc

        init = (
            lay.cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
            lay.cast(jnp.zeros((bq,), jnp.float32), row_layout),
            lay.cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
        )
        m, l, acc = lax.fori_loop(0, count, step, init)
        has_key = l > 0
        l_safe = jnp.where(has_key, l, 1.0)
        o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, (bq, d), [0])).astype(o_smem.dtype)
        lse_smem[...] = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, rows])
        plgpu.wait_smem_to_gmem(0)

    def entry(*refs):
        smem = (
            plgpu.SMEM((bq, d), dtype, transforms=_tile_transforms(dtype)),
            plgpu.SMEM((STAGES, d, bk), dtype, transforms=_tile_transforms(dtype)),
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=_tile_transforms(dtype)),
            plgpu.SMEM((bq, bk), dtype, transforms=_tile_transforms(dtype)),
            plgpu.SMEM((bq, d), out_dtype, transforms=_tile_transforms(out_dtype)),
            plgpu.SMEM((bq,), jnp.float32),
            plgpu.SMEM((width,), jnp.int32),
            plgpu.SMEM((2, bq), jnp.int32),  # query positions, segments
            plgpu.SMEM((STAGES, 2, bk), jnp.int32),  # key positions, segments
        )
        bars = (plgpu.Barrier(num_barriers=num_q_copies), plgpu.Barrier(num_barriers=4 * STAGES))
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch), smem, bars)

    args = [q, rearrange(k, "b t h d -> b h d t"), v, plan.q_pos, plan.kv_pos, kv_lists]
    if segmented:
        args += [q_seg, kv_seg]
    return plgpu.kernel(
        entry,
        out_type=(
            varying_struct((b, tq, h, d), out_dtype, q),
            varying_struct((b, h, tq), jnp.float32, q),
        ),
        grid=(nq, h, b),
        grid_names=("q", "h", "b"),
        interpret=_interpret_params(interpret),
    )(*args)
