"""The ``"mosaic_gpu"`` backend (H100/H200, sm_90): a FlashAttention-3 style Mosaic GPU forward.

What runs where (precisely):

* **forward**: the Mosaic GPU kernel in this module (:func:`forward`).
* **backward** (dQ, dK/dV): the Mosaic GPU kernels of
  ``kernels_pallas.gpu.hopper_bwd`` (warp-specialised as the forward: a producer
  and two consumers, exp2, per-element masks on edge tiles only), with their own tiles
  (``kernels_pallas.blocks.mosaic_gpu_backward_plan``, default 64 x 64); for
  head_dim 256 (beyond their SMEM) the portable kernels.

Forward kernel (grid ``(n_pairs, h, b)``, three warpgroups per program, ``thread_name="wg"``):

* **Warp specialisation.** Warpgroup 2 is the producer: it TMA-copies each key
  block (``K^T``, ``V``, key positions, key segments) into one of ``STAGES``
  SMEM slots, refilling a slot once both consumers have arrived on its "free"
  barriers (K after ``Q K^T``, V after ``P V``). Warpgroups 0 and 1 are the
  consumers; each owns one query block of ``block_q`` rows (a program covers
  ``2 block_q`` rows), runs ``wgmma`` and the online softmax, and gives
  registers up to / takes them from the producer (``set_max_registers``).
* **Ping-pong.** The consumers alternate at a two-arrival "turn" barrier twice
  per key block (consumer 1 starts one turn behind), so one's softmax runs
  while the other's matmuls occupy the tensor cores (as in FlashAttention-3
  and ``jax.experimental.pallas.ops.gpu.attention_mgpu``).
* **exp2.** Logits go straight to the log2 domain: ``scores * (scale log2 e)``
  is one multiply (with softcap, ``tanh(scores * scale / cap) * (cap log2 e)``);
  ``m`` is kept in log2 units and ``lse = ln2 m + ln l`` is natural-log at
  the interface.
* **Masks only where needed.** :func:`pair_schedule` (plain JAX, from the
  block plan) lists the key blocks visible to either query block of a pair
  (causal/window ranges, zigzag holes and, per batch row, other documents'
  blocks are never fetched) and codes each (query block, key block) as
  ``HIDDEN`` (only the other consumer sees it: the consumer keeps the barrier
  phases in step and computes nothing), ``EDGE``
  (diagonal, window edge, key padding, a segment boundary: the per-element
  :func:`kernels_pallas.block_math.visible` mask) or ``INTERIOR`` (every pair
  visible by ``Mask.block_full``, no padding, one segment on both sides: no
  mask, no empty-row guard). A consumer runs its leading interior blocks (causal
  attention's blocks below the diagonal) in a loop of their own, and switches over
  the codes only for the rest.
* GQA/MQA through the TMA source slice (KV head ``h // group``), never copied.
  ``Q K^T`` reads the K tile through ``plgpu.transpose_ref`` on hardware; the
  interpret mode does not simulate transposed refs, so there a pre-transposed
  copy of K (``[b, h_kv, d, Tk]``) is streamed as well (:class:`TransposedViews`).
* ``P V`` as JAX's own Mosaic GPU attention does it: the accumulator is rescaled
  during the softmax, and on hardware ``P`` is the register A operand of a wgmma
  accumulating into it in place (:func:`accumulate`). The interpret mode has neither
  register A operands nor ``run_state``, so there ``P`` goes through SMEM into a
  fresh accumulator that is then added: the same arithmetic; lowering for CUDA
  covers the compiled path.
* ``approx_math`` on hardware: ``exp2`` and the divisions as PTX approximations
  (``ex2.approx``), as JAX's kernel is compiled.
* Lengths: schedule rows (one entry per key block: 2049 at 128k keys with
  64-key blocks) go to SMEM in TMA pieces of at most 256 entries.

Validation, and what is NOT validated:

* On CPU, under the Mosaic GPU interpret mode (``InterpretGPUParams``,
  ``tests/kernels/test_hopper.py``): out, lse and (with the backward of
  ``hopper_bwd``) dq/dk/dv against ``reference_attention``.
  The interpret mode runs the three warpgroups as concurrent threads with
  simulated SMEM, TMA copies, barriers (it raises on a phase that a waiting
  thread skipped or an arrival completed twice before anyone observed it) and
  ``wgmma``. It does NOT model transposed SMEM refs (hence the pre-transposed
  copies it streams instead), register layouts (``layout_cast``/``plgpu.load``
  hints are identity there), asynchronous ``wgmma`` (it is synchronous),
  ``commit_smem`` fences, register reallocation, or timing, so it cannot show
  a race that only real concurrency of the tensor cores would expose, nor speed.
  It needs XLA's concurrency-optimised CPU scheduler off on machines with few
  cores, or it can hang (:func:`_warn_if_the_interpret_mode_may_hang`).
* On CPU, lowering for CUDA (``lowering_platforms=("cuda",)``) runs the
  Pallas -> Mosaic GPU lowering (layouts, TMA shapes and alignment, the
  ``lax.switch`` over codes) without compiling to PTX.
* On an H100 (2026-11-27, before the register ``P``, ``approx_math``, the
  ``transpose_ref`` K and the warp-specialised backward): the
  forward and gradients at real sizes matched the oracle, one of the two
  ring-position forward tests failed (it asked for a float32 output with 128-key
  blocks at head_dim 128, which :func:`_check_smem` refuses by design), and the forward
  ran at 0.53 to 0.60 of cuDNN, slower than the portable kernel
  (``benchmarks/results/kernels_nvidia_h100_80gb_hbm3.md``). ``backend="auto"``
  does not pick it (see ``kernels_pallas.api``) until ``tests/kernels/test_gpu.py``
  passes there and it is faster.

Alignment (checked in ``kernels_pallas.blocks``): ``block_q`` a multiple of 64
(wgmma M per warpgroup), ``block_kv`` a multiple of 64, both at most 256
(one TMA copy per Q/K/V tile and position row), ``head_dim`` a multiple of 64
up to 256; on hardware the inputs must be bfloat16/float16. SMEM
(``kernels_pallas.blocks.mosaic_gpu_forward_smem``): two Q tiles (reused for a
same-dtype output), ``STAGES`` K and V tiles and the schedule rows; a float32
output (ring steps) takes one more tile, shared by the consumers in turn
(:func:`_check_smem`). P goes from registers into the wgmma; only the interpret
mode allocates P tiles (and K^T ones), which the checks do not count. So a ring
step's float32 output fits the default (64, 128) tiles at head_dim 128 up to about
2,700 schedule entries (340k keys).
"""

from __future__ import annotations

import functools
import os
import warnings

import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import block_math
from kernels_pallas.blocks import MOSAIC_GPU_STAGES as STAGES
from kernels_pallas.blocks import MOSAIC_GPU_SMEM
from kernels_pallas.blocks import TMA_MAX_ELEMS
from kernels_pallas.blocks import mosaic_gpu_forward_smem
from kernels_pallas.tiles import BlockPlan, block_lists, segment_blocks
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling, pad_axis
from lca.parallel.vma import varying_struct

__all__ = ["STAGES", "Layouts", "TransposedViews", "accumulate", "copy_in", "forward", "kernel_options",
           "load_schedule", "log2_logits", "matmul", "pair_rows", "pair_schedule", "schedule_pieces", "tile_codes",
           "tile_mask", "tile_transforms"]

_SWIZZLE = 128  # bytes


_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@functools.cache
def _warn_if_the_interpret_mode_may_hang():
    """Once per process: the interpret mode can deadlock under XLA's default CPU scheduler.

    It runs the warpgroups as threads whose XLA computations block in barrier
    callbacks; XLA's concurrency-optimised CPU scheduler lets a blocked computation
    hold the intra-op pool workers another warpgroup's computation needs. Seen on
    CPU with jax 0.10.2: 128-key blocks hang on 2 cores, any blocks on 1.
    """
    if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
        warnings.warn(
            f"the mosaic_gpu interpret mode can hang on machines with few CPU cores; set "
            f"XLA_FLAGS='{_SCHEDULER_FLAG}' before JAX starts (tests/conftest.py does).",
            RuntimeWarning, stacklevel=3)


def _interpret_params():
    # jax 0.10.2 has no public alias for the Mosaic GPU interpret params (the TPU
    # ones are ``pltpu.InterpretParams``); passing them to ``plgpu.kernel`` runs
    # the kernel on CPU with simulated SMEM, TMA, barriers and wgmma.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    _warn_if_the_interpret_mode_may_hang()
    return InterpretGPUParams()


def kernel_options(interpret: bool) -> dict:
    """``plgpu.kernel``'s interpret params, or on hardware ``approx_math`` (PTX ``ex2.approx``), as JAX's kernels."""
    if interpret:
        return {"interpret": _interpret_params()}
    return {"compiler_params": plgpu.CompilerParams(approx_math=True)}


def tile_transforms(dtype):
    """Swizzled SMEM tiling that wgmma and TMA expect for 2-D operand tiles."""
    return (
        plgpu.TilingTransform((8, _SWIZZLE // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(_SWIZZLE),
    )


class Layouts:
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


class TransposedViews:
    """Streamed tiles ``x [block, d]`` that a wgmma also reads as ``x^T [d, block]`` (a B operand).

    On hardware ``x^T`` is ``plgpu.transpose_ref`` of the plain SMEM tile, as in
    JAX's own Mosaic GPU attention: one tile, one copy. The interpret mode does not
    simulate transposed refs, so there a second, pre-transposed tile is streamed
    from a ``[b, h, d, t]`` copy of ``x`` in HBM; these methods give nothing on hardware.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def sources(self, *xs):
        """The pre-transposed HBM operands ``[b, h, d, t]`` of ``xs [b, t, h, d]`` (interpret mode)."""
        return [rearrange(x, "b t h d -> b h d t") for x in xs] if self.interpret else []

    def smem(self, n: int, block: int, d: int, dtype):
        """SMEM for ``n`` pre-transposed tiles per stage (interpret mode)."""
        if not self.interpret:
            return None
        return plgpu.SMEM((n, STAGES, d, block), dtype, transforms=tile_transforms(dtype))

    def copies(self, sources, t_smem, slot, bi, head, span):
        """The TMA copies ``[(gmem, smem)]`` of one stage's pre-transposed tiles (interpret mode)."""
        return [(src.at[bi, head, :, span], t_smem.at[n, slot]) for n, src in enumerate(sources)]

    def t(self, plain, t_smem, n: int, slot):
        """``plain [block, d]`` transposed, ``[d, block]``: a view on hardware, else tile ``n`` of ``slot``."""
        return t_smem.at[n, slot] if self.interpret else plgpu.transpose_ref(plain, (1, 0))


def schedule_pieces(width: int):
    """A TMA copy moves at most ``TMA_MAX_ELEMS`` per dimension: schedule rows go in pieces
    (128-byte aligned: 256 int32s is a multiple of 32)."""
    return [pl.ds(start, min(TMA_MAX_ELEMS, width - start)) for start in range(0, width, TMA_MAX_ELEMS)]


def copy_in(copies, barrier, first=0):
    """TMA-copy ``[(gmem, smem)]`` in flight together (copy ``n`` on ``barrier.at[first + n]``), wait for all."""
    for n, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, barrier.at[first + n])
    for n in range(len(copies)):
        plgpu.barrier_wait(barrier.at[first + n])


def load_schedule(lists_ref, codes_ref, pair, bs, list_smem, code_smem, pieces, list_bar, start: bool):
    """A program's list row and its consumers' code rows (:func:`pair_rows`) into SMEM: the count.

    The producer (``start``) issues the copies; every warpgroup waits for all of them.
    """
    copies = [(lists_ref.at[bs, pair, piece], list_smem.at[piece]) for piece in pieces]
    copies += [(codes_ref.at[bs, 2 * pair + w, piece], code_smem.at[w, piece]) for w in range(2) for piece in pieces]
    if start:
        for n, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, list_bar.at[n])
    for n in range(len(copies)):
        plgpu.barrier_wait(list_bar.at[n])
    return list_smem[0]


def matmul(a_smem, b_smem, shape, while_running=None):
    """``a @ b`` of two SMEM tiles into a fresh wgmma accumulator, as an f32 value.

    ``while_running()`` runs after the wgmma is issued and before its result is
    awaited (on hardware the wgmma is asynchronous until the accumulator is read).
    """

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        if while_running is not None:
            while_running()
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def accumulate(acc, a, b_smem, interpret: bool):
    """``acc + a @ b``: on hardware a wgmma accumulating into ``acc`` in place, ``a`` in registers.

    The interpret mode has neither register A operands nor ``run_state``: there ``a``
    is an SMEM tile and the product goes to a fresh accumulator, then is added.
    """
    if interpret:
        return acc + matmul(a, b_smem, acc.shape)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(run)(plgpu.ACC.init(acc))


def tile_mask(lay: Layouts, mask: Mask, shape, q_tok, kv_tok, key_start, kv_len: int, segmented: bool,
              keys_on_rows: bool = False):
    """The per-element visibility of an edge tile: positions, segments and key padding.

    ``q_tok``, ``kv_tok``: ``[2, n]`` int32 SMEM rows (positions, then segments)
    of the tile's query and key block; ``key_start``: the key block's first index.
    Queries run along the tile's rows, keys along its columns, unless ``keys_on_rows``.
    """
    q_axis, k_axis = (1, 0) if keys_on_rows else (0, 1)

    def spread(ref, axis):  # one value per row (axis 0) or per column (axis 1)
        return lax.broadcast_in_dim(lay.load(ref, plgpu.Layout.WGMMA.reduce(1 - axis)), shape, [axis])

    key_ok = key_start + lay.iota(shape, k_axis) < kv_len
    q_seg, kv_seg = (spread(q_tok.at[1], q_axis), spread(kv_tok.at[1], k_axis)) if segmented else (None, None)
    return block_math.visible(mask, spread(q_tok.at[0], q_axis), spread(kv_tok.at[0], k_axis), key_ok, q_seg, kv_seg)


# Codes of (query block, visible key block) pairs in the consumers' schedule rows.
HIDDEN, EDGE, INTERIOR = 0, 1, 2


def log2_logits(scores, logit: LogitOptions):
    """``logit.apply(scores) * log2(e)`` with the scale folded into one multiply (the exp2 domain)."""
    if logit.softcap is None:
        return scores * (logit.scale * block_math.LOG2E)
    return jnp.tanh(scores * (logit.scale / logit.softcap)) * (logit.softcap * block_math.LOG2E)


def tile_codes(plan: BlockPlan, tiling: Tiling, mask: Mask, q_seg, kv_seg):
    """``[bs, nq, nk]`` int32: what a (query block, key block) tile needs, ``bs = b`` when segmented, else 1.

    ``HIDDEN`` (no pair visible by positions, or no segment id in common: never
    fetched), ``EDGE`` (diagonal, window edge,
    key padding, a segment boundary: the per-element
    :func:`kernels_pallas.block_math.visible` mask) or ``INTERIOR`` (every pair
    visible by ``Mask.block_full``, no padded key, one document on both sides: no
    mask, and no row of it can be empty).
    """
    nq, nk, bq, bk = tiling.num_q, tiling.num_kv, tiling.block_q, tiling.block_kv
    q_blk = plan.q_pos.reshape(nq, bq)
    kv_blk = plan.kv_pos.reshape(nk, bk)
    full = mask.block_full(q_blk.min(1)[:, None], q_blk.max(1)[:, None],
                           kv_blk.min(1)[None], kv_blk.max(1)[None])
    full = full & ((jnp.arange(nk) + 1) * bk <= tiling.kv_len)[None]  # no padded key in the block
    full = jnp.broadcast_to(full, (1, nq, nk))
    vis = (plan.vis != 0)[None]
    if q_seg is not None:
        meet, one_doc = segment_blocks(q_seg, kv_seg, tiling)
        vis, full = vis & meet, full & one_doc
    return jnp.where(vis, jnp.where(full, INTERIOR, EDGE), HIDDEN).astype(jnp.int32)


def pair_rows(code, align: int = 32, reverse: bool = False):
    """The schedule of programs that own two rows of ``code [bs, n, m]`` (tile codes) each.

    Returns ``(lists [bs, n_pairs, width], codes [bs, 2 n_pairs, width])`` int32 (per
    batch row with segment ids); an odd last row pairs with an all-``HIDDEN`` one:

    * ``lists[., p] = [count, j_0, ..., j_{count-1}, 0...]``: the columns visible to
      either row ``2p`` or ``2p + 1`` (the producer fetches each once), in
      ascending order, or descending with ``reverse``;
    * ``codes[., i, 1 + t]``: row ``i``'s code for the ``t``-th listed column
      (``HIDDEN`` past ``count``);
    * ``codes[., i, 0]``: how many listed columns from the first are ``INTERIOR``:
      a kernel runs those in a loop of their own, with no switch over the codes.
    """
    bs, n, m = code.shape
    n_pairs = -(-n // 2)
    code = pad_axis(code, 1, 2 * n_pairs)  # zeros: HIDDEN
    vis = (code != HIDDEN).reshape(bs * n_pairs, 2, m).any(axis=1)
    lists = block_lists(vis, align).reshape(bs, n_pairs, -1)
    count = lists[..., :1]
    if reverse:
        t = jnp.arange(lists.shape[2] - 1)
        lists = jnp.concatenate(
            [count, jnp.take_along_axis(lists[..., 1:], jnp.where(t < count, count - 1 - t, t), axis=2)], axis=2)
    listed = jnp.repeat(lists[..., 1:], 2, axis=1)  # [bs, 2 n_pairs, width - 1] column indices
    codes = jnp.take_along_axis(code, listed, axis=2)
    codes = jnp.where(jnp.arange(listed.shape[2]) < jnp.repeat(count, 2, axis=1), codes, HIDDEN)
    lead = jnp.cumprod(codes == INTERIOR, axis=2).sum(axis=2, dtype=jnp.int32)
    return lists, jnp.concatenate([lead[..., None], codes], axis=2)


def pair_schedule(plan: BlockPlan, tiling: Tiling, mask: Mask, q_seg, kv_seg, align: int = 32):
    """What a program of two query blocks streams (key blocks), and what each of its consumers does per block.

    :func:`pair_rows` of :func:`tile_codes`: ``lists [bs, n_pairs, width]`` of the key
    blocks visible to query block ``2p`` or ``2p + 1``, and ``codes [bs, 2 n_pairs,
    width]`` per query block (leading interior count, then a code per listed key block).
    Causal attention's interior blocks (below the diagonal) lead.
    """
    return pair_rows(tile_codes(plan, tiling, mask, q_seg, kv_seg), align)


def _check_smem(bq, bk, d, out_dtype, separate_out: bool, width):
    """A ``ValueError`` when the forward's SMEM on hardware (16-bit tiles) exceeds an sm_90 block's.

    ``kernels_pallas.blocks`` checks the tiles when the call is planned; what it
    cannot know there is the schedule rows' width (it grows with the key length)
    and an output of another dtype than the inputs (``kernel_forward(...,
    out_dtype=float32)`` on bfloat16, as ring steps ask for), which needs its own
    tile. Interpret-mode float32 tiles are counted as the bfloat16 they stand for.
    """
    out_bytes = jnp.dtype(out_dtype).itemsize if separate_out else 0
    need = mosaic_gpu_forward_smem(bq, bk, d, 2, width, out_bytes)
    available = MOSAIC_GPU_SMEM
    if need > available:
        fix = "use block_kv=64 (or a smaller block_q)" if bk > 64 else (
            "use a 16-bit output, head_dim <= 128, or backend='gpu_portable'")
        raise ValueError(
            f"the mosaic_gpu forward needs {need} bytes of shared memory with block_q={bq}, block_kv={bk}, "
            f"head_dim={d}, {width} schedule entries per query pair and a {jnp.dtype(out_dtype).name} "
            f"output ({available} available): {fix}."
        )


def forward(q, k, v, plan: BlockPlan, q_seg, kv_seg, *, tiling: Tiling, mask: Mask,
            logit: LogitOptions, out_dtype, interpret: bool):
    """``(out [b, Tq', h, d] out_dtype, lse [b, h, Tq'] f32)`` on padded inputs (``Tq' >= Tq``).

    Warp-specialised: per program (grid ``(n_pairs, h, b)``) three warpgroups, a
    producer that TMA-copies key blocks into ``STAGES`` SMEM slots and two
    consumers, each owning one query block of ``block_q`` rows, that run
    ``wgmma`` and the online softmax in ping-pong.
    """
    b, _, h, d = q.shape
    h_kv = k.shape[2]
    group = h // h_kv
    bq, bk = tiling.block_q, tiling.block_kv
    segmented = q_seg is not None
    dtype = q.dtype
    lists, codes = pair_schedule(plan, tiling, mask, q_seg, kv_seg)
    n_pairs, width = lists.shape[1:]
    tq = 2 * n_pairs * bq  # an odd number of query blocks gets one all-padding block
    q = pad_axis(q, 1, tq)
    q_pos = pad_axis(plan.q_pos, 0, tq, mode="edge")
    if segmented:
        q_seg = pad_axis(q_seg, 1, tq, mode="edge")
    lay = Layouts(interpret)
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per query row
    pieces = schedule_pieces(width)
    kv_copies = 4 if segmented else 3  # K, V, key positions, key segments (K^T in interpret mode: copy 4)
    views = TransposedViews(interpret)
    q_copies = 3 if segmented else 2  # Q, query positions, query segments
    separate_out = jnp.dtype(out_dtype) != jnp.dtype(dtype)  # else the output reuses Q's SMEM
    _check_smem(bq, bk, d, out_dtype, separate_out, width)

    def kernel(q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, lists_ref, codes_ref, *rest):
        rest = list(rest)
        qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if segmented else (None, None)
        kt_refs = [rest.pop(0)] if interpret else []
        o_ref, lse_ref, (smem, bars) = rest
        (q_smem, k_smem, kt_smem, v_smem, p_smem, o_smem, lse_smem, list_smem, code_smem, qtok_smem,
         kvtok_smem) = smem
        list_bar, q_bars, kv_bars, k_free, v_free, turn, out_free = bars
        wg = lax.axis_index("wg")
        pair, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        hk = lax.div(hi, jnp.int32(group))
        bs = bi if segmented else 0
        schedule = (lists_ref, codes_ref, pair, bs, list_smem, code_smem, pieces, list_bar)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            count = load_schedule(*schedule, start=True)

            def fetch(t, _):
                slot = lax.rem(t, jnp.int32(STAGES))
                keys = pl.ds(list_smem[1 + t] * bk, bk)

                @pl.when(t >= STAGES)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])  # both consumers are done with the slot's K

                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hk], k_smem.at[slot], kv_bars.at[slot * 5])
                for src, dst in views.copies(kt_refs, kt_smem, slot, bi, hk, keys):
                    plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[slot * 5 + 4])

                @pl.when(t >= STAGES)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                rest_ = [(v_ref.at[bi, keys, hk], v_smem.at[slot]), (kvpos_ref.at[keys], kvtok_smem.at[slot, 0])]
                if segmented:
                    rest_.append((kvseg_ref.at[bi, keys], kvtok_smem.at[slot, 1]))
                for n, (src, dst) in enumerate(rest_):
                    plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[slot * 5 + 1 + n])
                return None

            lax.fori_loop(0, count, fetch, None)

            def drain(t, _):
                # Observe the last frees too: a barrier phase nobody awaits is a protocol error
                # in the interpret mode, and on hardware the parity would drift.
                slot = lax.rem(t, jnp.int32(STAGES))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                return None

            lax.fori_loop(jnp.maximum(count - STAGES, 0), count, drain, None)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            rows = pl.ds((2 * pair + wg) * bq, bq)
            mine = [(q_ref.at[bi, rows, hi], q_smem.at[wg]), (qpos_ref.at[rows], qtok_smem.at[wg, 0])]
            if segmented:
                mine.append((qseg_ref.at[bi, rows], qtok_smem.at[wg, 1]))
            copy_in(mine, q_bars, wg * q_copies)
            count = load_schedule(*schedule, start=False)  # the rows the producer copies in

            def take_turn():
                """Ping-pong: the consumers alternate here, so one's softmax overlaps the other's wgmma."""
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

            def wait_k(slot):
                plgpu.barrier_wait(kv_bars.at[slot * 5])
                if interpret:
                    plgpu.barrier_wait(kv_bars.at[slot * 5 + 4])  # K^T

            def wait_rest(slot):
                for n in range(1, kv_copies):
                    plgpu.barrier_wait(kv_bars.at[slot * 5 + n])

            def visible_step(t, carry, edge: bool):
                m, l, acc = carry
                slot = lax.rem(t, jnp.int32(STAGES))
                wait_k(slot)
                # The turn is taken while this consumer's Q K^T runs on the tensor cores.
                s = matmul(q_smem.at[wg], views.t(k_smem.at[slot], kt_smem, 0, slot), (bq, bk),
                           while_running=take_turn)
                plgpu.barrier_arrive(k_free.at[slot])
                s = log2_logits(s, logit)
                wait_rest(slot)
                if edge:
                    s = jnp.where(tile_mask(lay, mask, (bq, bk), qtok_smem.at[wg], kvtok_smem.at[slot],
                                            list_smem[1 + t] * bk, tiling.kv_len, segmented), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                # An edge tile can leave a row with no key yet; an interior one cannot.
                m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if edge else m_new
                p = jnp.exp2(s - lax.broadcast_in_dim(m_ref, (bq, bk), [0]))
                alpha = jnp.exp2(m - m_ref)
                acc = acc * lax.broadcast_in_dim(alpha, (bq, d), [0])  # rescaled before P V, not after
                l = alpha * l + p.sum(axis=1)
                p16 = p.astype(dtype)
                if interpret:  # no register A operands there: P through SMEM
                    p_smem[wg] = p16
                    plgpu.commit_smem()  # make the register->SMEM stores visible to wgmma
                    p16 = p_smem.at[wg]
                elif d <= 128:
                    # The softmax is finished before the turn is taken, not moved past it by the
                    # compiler (JAX's Mosaic GPU attention found this ordering matters).
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                take_turn()
                acc = accumulate(acc, p16, v_smem.at[slot], interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return m_new, l, acc

            def hidden_step(t, carry):
                """A key block only the other consumer sees: keep the barriers' phases in step."""
                slot = lax.rem(t, jnp.int32(STAGES))
                wait_k(slot)
                take_turn()
                plgpu.barrier_arrive(k_free.at[slot])
                wait_rest(slot)
                take_turn()
                plgpu.barrier_arrive(v_free.at[slot])
                return carry

            def step(t, carry):
                branches = [hidden_step, functools.partial(visible_step, edge=True),
                            functools.partial(visible_step, edge=False)]
                return lax.switch(code_smem[wg, 1 + t], branches, t, carry)

            init = (
                lay.cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
                lay.cast(jnp.zeros((bq,), jnp.float32), row_layout),
                lay.cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
            )
            pl.when(wg == 1)(take_turn)  # consumer 1 starts one turn behind
            # Every step takes two turns and frees its slot once, whatever its code, so the
            # consumers may split their loops at different points.
            lead = code_smem[wg, 0]
            carry = lax.fori_loop(0, lead, functools.partial(visible_step, edge=False), init)
            m, l, acc = lax.fori_loop(lead, count, step, carry)
            pl.when(wg == 0)(take_turn)  # ... and consumer 0 ends one behind: equal turns
            has_key = l > 0
            l_safe = jnp.where(has_key, l, 1.0)
            out = (acc / lax.broadcast_in_dim(l_safe, (bq, d), [0])).astype(out_dtype)
            # m is in log2 units: lse = ln(2) m + ln(l), natural log at the interface.
            lse_smem[wg] = jnp.where(has_key, m * block_math.LN2 + jnp.log(l_safe), -jnp.inf)

            def store(out_smem):
                out_smem[...] = out
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, o_ref.at[bi, rows, hi])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, rows])
                plgpu.wait_smem_to_gmem(0)

            if not separate_out:
                store(q_smem.at[wg])  # Q is no longer read
            else:
                # One wider output tile, taken in turn (SMEM is short): consumer 0 stores
                # first and hands the tile over once its copy has read it.
                pl.when(wg == 1)(lambda: plgpu.barrier_wait(out_free))
                store(o_smem)
                pl.when(wg == 0)(lambda: plgpu.barrier_arrive(out_free))

    def entry(*refs):
        tile = tile_transforms(dtype)
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=tile),
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=tile),  # K
            views.smem(1, bk, d, dtype),  # K^T (interpret mode)
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=tile),  # V
            plgpu.SMEM((2, bq, bk), dtype, transforms=tile) if interpret else None,  # P (interpret mode)
            plgpu.SMEM((bq, d), out_dtype, transforms=tile_transforms(out_dtype)) if separate_out else None,
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((width,), jnp.int32),
            plgpu.SMEM((2, width), jnp.int32),
            plgpu.SMEM((2, 2, bq), jnp.int32),  # per consumer: query positions, segments
            plgpu.SMEM((STAGES, 2, bk), jnp.int32),  # per slot: key positions, segments
        )
        bars = (
            plgpu.Barrier(num_barriers=3 * len(pieces)),
            plgpu.Barrier(num_barriers=2 * q_copies),
            plgpu.Barrier(num_barriers=5 * STAGES),
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # K slot free
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # V slot free
            plgpu.Barrier(num_arrivals=2),  # the consumers' turns
            plgpu.Barrier(),  # the wider output tile is free for consumer 1
        )
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch), smem, bars, collective_axes="wg")

    args = [q, k, v, q_pos, plan.kv_pos, lists, codes]
    if segmented:
        args += [q_seg, kv_seg]
    args += views.sources(k)
    return plgpu.kernel(
        entry,
        out_type=(
            varying_struct((b, tq, h, d), out_dtype, q),
            varying_struct((b, h, tq), jnp.float32, q),
        ),
        grid=(n_pairs, h, b),
        grid_names=("q", "h", "b"),
        num_threads=3,
        thread_name="wg",
        **kernel_options(interpret),
    )(*args)
