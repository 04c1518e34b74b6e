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
With segment ids ``first``/``last`` are per batch row (``tiles.by_segments``): a
packed row's blocks stream only their own documents' blocks.

TPU correctness is tested on CPU through the TPU interpret mode only
(``pltpu.InterpretParams``); no TPU run backs this module.
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import block_math, tiles
from kernels_pallas.tiles import BlockPlan, KernelGrid
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling
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


def _row(table, bi):
    """The row of a ``[rows, n]`` first/last table for batch row ``bi``: one row serves all
    batch rows without segment ids, one per batch row with them (``tiles.by_segments``)."""
    return bi if table.shape[0] > 1 else 0


def _key_valid(tiling: Tiling, j):
    idx = j * tiling.block_kv + lax.broadcasted_iota(jnp.int32, (1, tiling.block_kv), 1)
    return idx < tiling.kv_len


class _Grid(KernelGrid):
    """Grid and block specs of one TPU kernel, arrays ``[b, heads, T, d]``.

    Index maps get ``(*grid indices, vis, first, last)``. Query-major (forward,
    dQ): grid ``(b, h, nq, nk)``, the key index streams inside ``[first, last]``
    of query block ``i``. Key-major (dK/dV): grid ``(b, h_kv, nk, group * nq)``,
    the innermost index ``t = g * nq + i`` walks the group's query heads and
    their query blocks inside ``[first, last]`` of key block ``j``.
    """

    HEADS_AXIS = 1

    def shape(self, b: int, heads: int):
        t = self.tiling
        if self.key_major:
            return (b, heads, t.num_kv, self.group * t.num_q)
        return (b, heads, t.num_q, t.num_kv)

    def schedule(self, vis_ref, first_ref, last_ref, *, init, step, finish):
        """One program's grid step: ``init()`` at the first, ``step(kv_block)`` on a visible
        block of ``[first, last]``, ``finish()`` at the last (the accumulators live in VMEM)."""
        own, t = pl.program_id(2), pl.program_id(3)
        other = t % self.tiling.num_q if self.key_major else t
        vis = vis_ref[other, own] if self.key_major else vis_ref[own, other]
        pl.when(t == 0)(init)
        row = _row(first_ref, pl.program_id(0))
        run = (other >= first_ref[row, own]) & (other <= last_ref[row, own]) & (vis != 0)
        pl.when(run)(lambda: step(own if self.key_major else t))
        steps = self.group * self.tiling.num_q if self.key_major else self.tiling.num_kv
        pl.when(t == steps - 1)(finish)

    def q_index(self, bi, hi, a, c, vis=None, first=None, last=None):
        if self.key_major:
            return _clamp(c % self.tiling.num_q, first[_row(first, bi), a], last[_row(first, bi), a])
        return a

    def kv_index(self, bi, hi, a, c, vis=None, first=None, last=None):
        if self.key_major:
            return a
        return _clamp(c, first[_row(first, bi), a], last[_row(first, bi), a])

    def _q_head(self, g):
        return g[1] * self.group + g[3] // self.tiling.num_q if self.key_major else g[1]

    def _kv_head(self, g):
        return g[1] if self.key_major else g[1] // self.group

    def queries(self):
        """``[b, h, Tq, d]`` arrays: q, dout, out."""
        return pl.BlockSpec((None, None, self.tiling.block_q, self.head_dim),
                            lambda *g: (g[0], self._q_head(g), self.q_index(*g), 0))

    def query_rows(self):
        """``[b, h, Tq, 1]`` per-query statistics: lse, delta."""
        return pl.BlockSpec((None, None, self.tiling.block_q, 1),
                            lambda *g: (g[0], self._q_head(g), self.q_index(*g), 0))

    def keys(self):
        """``[b, h_kv, Tk, d]`` arrays: k, v, dk, dv."""
        return pl.BlockSpec((None, None, self.tiling.block_kv, self.head_dim),
                            lambda *g: (g[0], self._kv_head(g), self.kv_index(*g), 0))

    def token_inputs(self, plan: BlockPlan, q_seg, kv_seg):
        """``[(array, spec)]`` of positions (and segments): query columns, key rows."""
        bq, bk = self.tiling.block_q, self.tiling.block_kv
        inputs = [
            (plan.q_pos[:, None], pl.BlockSpec((bq, 1), lambda *g: (self.q_index(*g), 0))),
            (plan.kv_pos[None, :], pl.BlockSpec((1, bk), lambda *g: (0, self.kv_index(*g)))),
        ]
        if q_seg is not None:
            inputs += [
                (q_seg[:, :, None],
                 pl.BlockSpec((None, bq, 1), lambda *g: (g[0], self.q_index(*g), 0))),
                (kv_seg[:, None, :],
                 pl.BlockSpec((None, 1, bk), lambda *g: (g[0], 0, self.kv_index(*g)))),
            ]
        return inputs


def _call(kernel, grid: _Grid, shape, plan: BlockPlan, tensors, tokens, outputs, scratch, *,
          name, interpret):
    """``pallas_call`` of ``kernel(vis, first, last, *tensor_refs, token_refs, *out_refs, *scratch)``.

    ``vis``/``first``/``last`` (the program's own side) are scalar-prefetched into
    SMEM; ``tensors``/``tokens``: ``[(array, spec)]``; ``outputs``: ``[(struct, spec)]``.
    """
    n_in, n_tok = len(tensors), len(tokens)

    def body(vis, first, last, *refs):
        kernel(vis, first, last, *refs[:n_in], refs[n_in:n_in + n_tok], *refs[n_in + n_tok:])

    first, last = (plan.q_first, plan.q_last) if grid.key_major else (plan.kv_first, plan.kv_last)
    first, last = first.reshape(-1, first.shape[-1]), last.reshape(-1, last.shape[-1])
    inputs = tensors + tokens
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=shape,
        in_specs=[spec for _, spec in inputs],
        out_specs=[spec for _, spec in outputs],
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        body,
        grid_spec=grid_spec,
        out_shape=[struct for struct, _ in outputs],
        name=name,
        **_call_options(interpret, len(shape)),
    )(plan.vis, first, last, *[array for array, _ in inputs])


def _row_plan(plan: BlockPlan, q_seg, kv_seg, tiling: Tiling) -> BlockPlan:
    """With segment ids, ``first``/``last`` per batch row (``tiles.by_segments``): a packed row's
    blocks stream only their own documents' blocks. ``vis`` stays the positions' ``[nq, nk]``:
    one per batch row would multiply the SMEM it is prefetched into by the batch."""
    if q_seg is None:
        return plan
    return tiles.by_segments(plan, q_seg, kv_seg, tiling)._replace(vis=plan.vis)


def _tile_visible(mask, tiling, j, tok_refs):
    """Visibility ``[bq, bk]`` of the current tile from the position/segment refs."""
    qpos_ref, kvpos_ref, *seg_refs = tok_refs
    qs, ks = (seg_refs[0][...], seg_refs[1][...]) if seg_refs else (None, None)
    return block_math.visible(mask, qpos_ref[...], kvpos_ref[...], _key_valid(tiling, j), qs, ks)


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool):
    """``(out [b, Tq, h, d] out_dtype, lse [b, h, Tq] f32)`` on padded inputs."""
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    b, h, tq, d = q.shape
    grid = _Grid.of(tiling, q, k, key_major=False)
    plan = _row_plan(plan, q_seg, kv_seg, tiling)

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, tok_refs, o_ref, lse_ref,
               m_ref, l_ref, acc_ref):
        def init():
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        def step(j):
            ok = _tile_visible(mask, tiling, j, tok_refs)
            s, _ = block_math.logits(q_ref[...], k_ref[...], logit, ok)
            m, l, acc = block_math.online_softmax_step(
                m_ref[...], l_ref[...], acc_ref[...], s, v_ref[...]
            )
            m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

        def finish():
            out, lse = block_math.finalize(m_ref[...], l_ref[...], acc_ref[...])
            o_ref[...] = out.astype(o_ref.dtype)
            lse_ref[...] = lse

        grid.schedule(vis_ref, first_ref, last_ref, init=init, step=step, finish=finish)

    bq = tiling.block_q
    out, lse = _call(
        kernel, grid, grid.shape(b, h), plan,
        [(q, grid.queries()), (k, grid.keys()), (v, grid.keys())],
        grid.token_inputs(plan, q_seg, kv_seg),
        [(varying_struct((b, h, tq, d), out_dtype, q), grid.queries()),
         (varying_struct((b, h, tq, 1), jnp.float32, q), grid.query_rows())],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)],
        name="lca_flash_fwd_tpu", interpret=interpret,
    )
    return _btdh(out), lse[..., 0]


def _dq(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    grid = _Grid.of(tiling, q, k, key_major=False)

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               tok_refs, dq_ref, acc_ref):
        def init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        def step(j):
            ok = _tile_visible(mask, tiling, j, tok_refs)
            k_tile = k_ref[...]
            _, ds = block_math.probs_and_dlogits(
                q_ref[...], k_tile, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                logit, ok,
            )
            acc_ref[...] += block_math.dq_tile(ds, k_tile)

        def finish():
            dq_ref[...] = acc_ref[...]

        grid.schedule(vis_ref, first_ref, last_ref, init=init, step=step, finish=finish)

    (dq,) = _call(
        kernel, grid, grid.shape(q.shape[0], q.shape[1]), plan,
        grid.gradient_inputs(q, k, v, do, lse, delta),
        grid.token_inputs(plan, q_seg, kv_seg),
        [(varying_struct(q.shape, jnp.float32, q), grid.queries())],
        [pltpu.VMEM((tiling.block_q, grid.head_dim), jnp.float32)],
        name="lca_flash_dq_tpu", interpret=interpret,
    )
    return dq


def _dkdv(q, k, v, do, lse, delta, plan, q_seg, kv_seg, *, tiling, mask, logit, interpret):
    grid = _Grid.of(tiling, q, k, key_major=True)

    def kernel(vis_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               tok_refs, dk_ref, dv_ref, dk_acc, dv_acc):
        def init():
            dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
            dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        def step(j):
            ok = _tile_visible(mask, tiling, j, tok_refs)
            q_tile, do_tile = q_ref[...], do_ref[...]
            p, ds = block_math.probs_and_dlogits(
                q_tile, k_ref[...], v_ref[...], do_tile, lse_ref[...], delta_ref[...], logit, ok
            )
            dk, dv = block_math.dkv_tiles(p, ds, q_tile, do_tile)
            dk_acc[...] += dk
            dv_acc[...] += dv

        def finish():
            dk_ref[...] = dk_acc[...]
            dv_ref[...] = dv_acc[...]

        grid.schedule(vis_ref, first_ref, last_ref, init=init, step=step, finish=finish)

    grads = varying_struct(k.shape, jnp.float32, q)
    return _call(
        kernel, grid, grid.shape(k.shape[0], k.shape[1]), plan,
        grid.gradient_inputs(q, k, v, do, lse, delta),
        grid.token_inputs(plan, q_seg, kv_seg),
        [(grads, grid.keys()), (grads, grid.keys())],
        [pltpu.VMEM((tiling.block_kv, grid.head_dim), jnp.float32)] * 2,
        name="lca_flash_dkdv_tpu", interpret=interpret,
    )


def backward(q, k, v, do, lse, delta, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling,
             mask: Mask, logit: LogitOptions, interpret: bool):
    """``(dq [b, Tq, h, d], dk, dv [b, Tk, h_kv, d])`` float32 on padded inputs.

    ``lse`` (0 on empty rows) and ``delta = rowsum(do * out) - dlse`` are ``[b, h, Tq]``.
    """
    args = (_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(do), lse[..., None], delta[..., None],
            _row_plan(plan, q_seg, kv_seg, tiling), q_seg, kv_seg)
    kw = dict(tiling=tiling, mask=mask, logit=logit, interpret=interpret)
    dq = _dq(*args, **kw)
    dk, dv = _dkdv(*args, **kw)
    return _btdh(dq), _btdh(dk), _btdh(dv)
