"""Mosaic TPU flash attention: forward, dQ and dK/dV with VMEM scratch accumulators.

Arrays are moved to the TPU-friendly ``[b, heads, len, d]`` layout (so a tile's
last two dims are ``(block, head_dim)``); per-token data is 2-D: query
positions/segments, lse and delta as ``[len, 1]`` columns, key positions and
segments as ``[1, len]`` rows.

* forward, grid ``(b, h, nq, nk)`` (``nk`` innermost, "arbitrary"): running max,
  sum and accumulator live in VMEM scratch across the key steps.
* dQ, grid ``(b, h, nq, nk)``: a VMEM ``dq`` accumulator.
* dK/dV, grid ``(b, h_kv, nk, group * nq)``: the innermost axis walks the
  ``group`` query heads sharing the KV head and their query blocks, so GQA
  gradients are summed in VMEM (K/V are never repeated).

Block skipping: the plan's ``vis/first/last`` tables are scalar-prefetched into
SMEM. Index maps clamp the streamed block index into ``[first, last]`` so the
pipeline issues no DMA for blocks outside it (the block index does not change),
and ``pl.when`` skips the compute of every block whose ``vis`` bit is 0. The
grid itself is not shrunk, so skipped steps still cost a (tiny) loop iteration.

TPU correctness is tested on CPU through the TPU interpret mode only
(``pltpu.InterpretParams``); no TPU run backs this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import block_math
from kernels_pallas.tiles import BlockPlan, Tiling
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.parallel.vma import varying_struct


def _call_options(interpret: bool, num_grid_dims: int):
    semantics = ("parallel",) * (num_grid_dims - 1) + ("arbitrary",)
    options = {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}
    if interpret:
        options["interpret"] = pltpu.InterpretParams()
    return options


def _clamp(idx, first, last):
    """Stream index: ``idx`` clamped into ``[first, last]``; an unchanged index means no DMA."""
    return jnp.minimum(jnp.maximum(idx, first), jnp.maximum(last, first))


def _bhtd(x):
    return rearrange(x, "b t h d -> b h t d")


def _btdh(x):
    return rearrange(x, "b h t d -> b t h d")


def _key_valid(tiling: Tiling, j):
    idx = j * tiling.block_kv + lax.broadcasted_iota(jnp.int32, (1, tiling.block_kv), 1)
    return idx < tiling.kv_len


def _token_inputs(plan: BlockPlan, q_seg, kv_seg, q_block_index, kv_block_index, tiling):
    """Specs and arrays for positions (and segments): query columns, key rows."""
    bq, bk = tiling.block_q, tiling.block_kv
    specs = [
        pl.BlockSpec((bq, 1), lambda *g: (q_block_index(*g), 0)),
        pl.BlockSpec((1, bk), lambda *g: (0, kv_block_index(*g))),
    ]
    arrays = [plan.q_pos[:, None], plan.kv_pos[None, :]]
    if q_seg is not None:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda *g: (g[0], q_block_index(*g), 0)),
            pl.BlockSpec((None, 1, bk), lambda *g: (g[0], 0, kv_block_index(*g))),
        ]
        arrays += [q_seg[:, :, None], kv_seg[:, None, :]]
    return specs, arrays


def _tile_visible(mask, tiling, j, tok_refs):
    """Visibility ``[bq, bk]`` of the current tile from the position/segment refs."""
    qpos_ref, kvpos_ref, *seg_refs = tok_refs
    qs, ks = (seg_refs[0][...], seg_refs[1][...]) if seg_refs else (None, None)
    return block_math.visible(mask, qpos_ref[...], kvpos_ref[...], _key_valid(tiling, j), qs, ks)


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    b, tq, h, d = q.shape
    h_kv = k.shape[2]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    n_tok = 2 if q_seg is None else 4

    def kv_index(bi, hi, i, j, vis, first, last):
        return _clamp(j, first[i], last[i])

    def q_index(bi, hi, i, j, *_):
        return i

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, *rest):
        tok_refs = rest[:n_tok]
        o_ref, lse_ref, m_ref, l_ref, acc_ref = rest[n_tok:]
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        run = (j >= first_ref[i]) & (j <= last_ref[i]) & (vis_ref[i, j] != 0)

        @pl.when(run)
        def _step():
            ok = _tile_visible(mask, tiling, j, tok_refs)
            s, _ = block_math.logits(q_ref[...], k_ref[...], logit, ok)
            m, l, acc = block_math.online_softmax_step(
                m_ref[...], l_ref[...], acc_ref[...], s, v_ref[...]
            )
            m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

        @pl.when(j == nk - 1)
        def _finish():
            out, lse = block_math.finalize(m_ref[...], l_ref[...], acc_ref[...])
            o_ref[...] = out.astype(o_ref.dtype)
            lse_ref[...] = lse

    tok_specs, tok_arrays = _token_inputs(plan, q_seg, kv_seg, q_index, kv_index, tiling)
    row = lambda bi, hi, i, j, *_: (bi, hi, i, 0)  # noqa: E731
    kv = lambda bi, hi, i, j, *p: (bi, hi // group, kv_index(bi, hi, i, j, *p), 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, h, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bk, d), kv),
            pl.BlockSpec((None, None, bk, d), kv),
            *tok_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bq, 1), row),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            varying_struct((b, h, tq, d), out_dtype, q),
            varying_struct((b, h, tq, 1), jnp.float32, q),
        ],
        name="lca_flash_fwd_tpu",
        **_call_options(interpret, 4),
    )(plan.vis, plan.kv_first, plan.kv_last, _bhtd(q), _bhtd(k), _bhtd(v), *tok_arrays)
    return _btdh(out), lse[..., 0]


def _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, h, tq, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    n_tok = 2 if q_seg is None else 4

    def kv_index(bi, hi, i, j, vis, first, last):
        return _clamp(j, first[i], last[i])

    def q_index(bi, hi, i, j, *_):
        return i

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *rest):
        tok_refs = rest[:n_tok]
        dq_ref, acc_ref = rest[n_tok:]
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when((j >= first_ref[i]) & (j <= last_ref[i]) & (vis_ref[i, j] != 0))
        def _step():
            ok = _tile_visible(mask, tiling, j, tok_refs)
            k_tile = k_ref[...]
            _, ds = block_math.probs_and_dlogits(
                q_ref[...], k_tile, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                logit, ok,
            )
            acc_ref[...] += block_math.dq_tile(ds, k_tile)

        @pl.when(j == nk - 1)
        def _finish():
            dq_ref[...] = acc_ref[...]

    tok_specs, tok_arrays = _token_inputs(plan, q_seg, kv_seg, q_index, kv_index, tiling)
    row = lambda bi, hi, i, j, *_: (bi, hi, i, 0)  # noqa: E731
    kv = lambda bi, hi, i, j, *p: (bi, hi // group, kv_index(bi, hi, i, j, *p), 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, h, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bk, d), kv),
            pl.BlockSpec((None, None, bk, d), kv),
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, 1), row),
            *tok_specs,
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), row),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=varying_struct((b, h, tq, d), jnp.float32, q),
        name="lca_flash_dq_tpu",
        **_call_options(interpret, 4),
    )(plan.vis, plan.kv_first, plan.kv_last, q, k, v, do, lse, delta, *tok_arrays)


def _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, bk, nq, nk = tiling.block_q, tiling.block_kv, tiling.num_q, tiling.num_kv
    n_tok = 2 if q_seg is None else 4

    # Innermost axis t walks (query head of the group, query block): t = g * nq + i.
    def q_index(bi, hk, j, t, vis, first, last):
        return _clamp(t % nq, first[j], last[j])

    def kv_index(bi, hk, j, t, *_):
        return j

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *rest):
        tok_refs = rest[:n_tok]
        dk_ref, dv_ref, dk_acc, dv_acc = rest[n_tok:]
        j, t = pl.program_id(2), pl.program_id(3)
        i = t % nq

        @pl.when(t == 0)
        def _init():
            dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
            dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        @pl.when((i >= first_ref[j]) & (i <= last_ref[j]) & (vis_ref[i, j] != 0))
        def _step():
            ok = _tile_visible(mask, tiling, j, tok_refs)
            q_tile, do_tile = q_ref[...], do_ref[...]
            p, ds = block_math.probs_and_dlogits(
                q_tile, k_ref[...], v_ref[...], do_tile, lse_ref[...], delta_ref[...], logit, ok
            )
            dk, dv = block_math.dkv_tiles(p, ds, q_tile, do_tile)
            dk_acc[...] += dk
            dv_acc[...] += dv

        @pl.when(t == group * nq - 1)
        def _finish():
            dk_ref[...] = dk_acc[...]
            dv_ref[...] = dv_acc[...]

    tok_specs, tok_arrays = _token_inputs(plan, q_seg, kv_seg, q_index, kv_index, tiling)
    row = lambda bi, hk, j, t, *p: (bi, hk * group + t // nq, q_index(bi, hk, j, t, *p), 0)  # noqa: E731
    key = lambda bi, hk, j, t, *_: (bi, hk, j, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, h_kv, nk, group * nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bk, d), key),
            pl.BlockSpec((None, None, bk, d), key),
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, 1), row),
            *tok_specs,
        ],
        out_specs=[pl.BlockSpec((None, None, bk, d), key)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[varying_struct((b, h_kv, tk, d), jnp.float32, q)] * 2,
        name="lca_flash_dkdv_tpu",
        **_call_options(interpret, 4),
    )(plan.vis, plan.q_first, plan.q_last, q, k, v, do, lse, delta, *tok_arrays)


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    """
    args = (_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(do), lse[..., None], delta[..., None], plan,
            q_seg, kv_seg)
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret)
    dq = _dq(*args, **kw)
    dk, dv = _dkdv(*args, **kw)
    return _btdh(dq), _btdh(dk), _btdh(dv)
