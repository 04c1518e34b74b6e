"""Ring attention: exact attention over a sequence sharded across a mesh axis.

Each of the ``n`` devices of the context axis keeps its query shard and passes
its key/value shard around a ring with ``lax.ppermute``. At every step a device
attends its queries to the key chunk it currently holds, through the local
implementation ``impl`` (blockwise or the Pallas kernels), and merges the partial
result into its running ``(out, lse)`` in float32 with :func:`merge_attention`.
The transfer of the next chunk is issued before the current one is computed so
the collective overlaps compute, and there is no transfer after the last step.

Masking is purely positional: every token carries its global position, so any
layout (``zigzag``, ``contiguous``, ``striped``) is correct under the one
:class:`Mask`, and a (query chunk, key chunk) pair that the mask hides entirely
(a causal chunk in the future, a window out of reach) is skipped with
``lax.cond``. Zigzag gives every device two chunks, ``i`` and ``2n-1-i``, so all
devices do the same causal work, and each step covers its visible chunk pairs
with one local call (see ``_RECTANGLES``; with a window, a first step walks its pairs).

The backward is a ``jax.custom_vjp`` that runs the ring again: K/V travel as in
the forward and their gradients dK/dV travel with them, each step adding the
exact piece ``impl.backward`` computes from the *global* output and lse; one
extra hop brings dK/dV home. Memory per device is O(T/n): nothing of the full
sequence length is ever gathered.

This module holds the ring only; validation, the call spec and running a
shard body over a mesh are shared with Ulysses and USP in
:mod:`lca.attention.sharded`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax

from lca.attention import inputs, sharded
from lca.attention.mask import Mask
from lca.attention.merge import merge_attention
from lca.attention.sharded import CallSpec
from lca.attention.vjp import attention_vjp
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard
from lca.parallel.vma import mark_varying


@dataclasses.dataclass(frozen=True)
class RingStatic:
    """Everything static about one ring call (hashable: a ``custom_vjp`` nondiff arg)."""

    spec: CallSpec
    axis_name: str
    chunks: int  # runs of consecutive positions per shard (zigzag: 2)


def _over_pairs(chunks: int, body, carry):
    """``carry = body(carry, a, c)`` for every (query chunk a, key chunk c) pair.

    A scan rather than an unrolled loop: one copy of the local attention in the
    program, whatever the number of chunks (compile time matters on TPU/CPU too).
    """
    a_idx, c_idx = np.divmod(np.arange(chunks * chunks, dtype=np.int32), chunks)
    carry, _ = lax.scan(lambda cr, ac: (body(cr, *ac), None), carry,
                        (jnp.asarray(a_idx), jnp.asarray(c_idx)))
    return carry


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _pair_visible(mask: Mask, q_pos, kv_pos):
    """Can any query of this chunk see any key of that chunk (from position ranges)?"""
    if mask.is_full:
        return True
    return mask.block_visible(q_pos.min(), q_pos.max(), kv_pos.min(), kv_pos.max())


def _when(visible, fn, carry):
    return fn(carry) if visible is True else lax.cond(visible, fn, lambda c: c, carry)


# --- which chunk pairs one step computes -----------------------------------------------

# With two chunks per shard (zigzag), a causal step after the first sees either
# both query chunks against the first key chunk (the key shard comes from an
# earlier device) or the second query chunk against both key chunks (a later
# device): one rectangle, computed by ONE local call of twice a chunk pair's size
# instead of a scan over four pairs. ``_RECTANGLES`` lists those shapes as
# (query chunks, key chunks). The first step's diagonal (each query chunk against
# its own, the second also against the first) is one call over the whole shard
# (``_WHOLE``): the local implementations skip the hidden tiles themselves, and
# cuDNN takes it as plain causal attention, index order being position order. With
# a window a step whose visible pairs fit neither rectangle walks the pairs one by
# one instead, so that cuDNN still runs the pairs whose window it can express.
_RECTANGLES = (((0, 1), (0,)), ((1,), (0, 1)))
_WHOLE = ((0, 1), (0, 1))


def _rectangles(st: RingStatic):
    """The chunk rectangles a step may run as one call, in order of preference."""
    return _RECTANGLES + ((_WHOLE,) if st.spec.mask.window is None else ())


def _visibility(st: RingStatic, q_pos, kv_pos):
    """``[chunks, chunks]`` bool: may query chunk a see key chunk c?"""
    q_parts = jnp.split(q_pos, st.chunks)
    kv_parts = jnp.split(kv_pos, st.chunks)
    return jnp.stack([jnp.stack([jnp.asarray(_pair_visible(st.spec.mask, qp, kp))
                                 for kp in kv_parts]) for qp in q_parts])


def _plan(st: RingStatic, q_pos, kv_pos):
    """Branch index for this step: 0 skip, 1 + r for ``_rectangles(st)[r]``, then pair by pair."""
    vis = _visibility(st, q_pos, kv_pos)
    rectangles = _rectangles(st)
    branch = jnp.int32(1 + len(rectangles))
    for r in reversed(range(len(rectangles))):
        rows, cols = rectangles[r]
        outside = np.ones(vis.shape, bool)
        outside[np.ix_(rows, cols)] = False
        branch = jnp.where(jnp.any(vis & outside), branch, 1 + r)
    return jnp.where(jnp.any(vis), branch, 0)


def _span(chunk_ids, length: int, chunks: int):
    """Static (start, size) of consecutive chunks ``chunk_ids`` in a shard of ``length``."""
    size = length // chunks
    return chunk_ids[0] * size, len(chunk_ids) * size


def _cut(x, span, axis: int):
    """``x[span]`` along ``axis`` (start static or traced); None stays None."""
    return None if x is None else lax.dynamic_slice_in_dim(x, span[0], span[1], axis)


def _paste(x, piece, span, axis: int):
    return lax.dynamic_update_slice_in_dim(x, piece, span[0], axis)


def _by_plan(st: RingStatic, q_pos, kv_pos, rectangle, carry, fresh: bool):
    """Run this step's plan, a ``rectangle(carry, qs, ks, fresh)`` call per chunk rectangle.

    Spans ``qs``, ``ks`` are ``(start, size)`` along the local sequence. A plan
    that is no rectangle runs one call per visible chunk pair. ``fresh``: ``carry``
    holds nothing yet (the first step), so a plan of one call may overwrite its
    rows instead of merging into them; pair by pair always merges.
    """

    def pairwise(carry):
        lq, lk = q_pos.shape[0] // st.chunks, kv_pos.shape[0] // st.chunks

        def pair(carry, q_chunk, kv_chunk):
            qs, ks = (q_chunk * lq, lq), (kv_chunk * lk, lk)
            visible = _pair_visible(st.spec.mask, _cut(q_pos, qs, 0), _cut(kv_pos, ks, 0))
            return _when(visible, lambda carry: rectangle(carry, qs, ks, False), carry)

        return _over_pairs(st.chunks, pair, carry)

    if st.chunks == 1 or st.spec.mask.is_full:
        return _when(_pair_visible(st.spec.mask, q_pos, kv_pos),
                     lambda c: rectangle(c, (0, q_pos.shape[0]), (0, kv_pos.shape[0]), fresh), carry)
    rectangles = _rectangles(st)
    spans = [(_span(rows, q_pos.shape[0], st.chunks), _span(cols, kv_pos.shape[0], st.chunks))
             for rows, cols in rectangles]
    branches = [lambda c: c]
    branches += [functools.partial(rectangle, qs=qs, ks=ks, fresh=fresh) for qs, ks in spans]
    if _WHOLE not in rectangles:  # else every plan fits a rectangle
        branches.append(pairwise)
    return lax.switch(_plan(st, q_pos, kv_pos), branches, carry)


# --- one ring step --------------------------------------------------------------------


def _forward_step(st: RingStatic, q_side, kv, acc, fresh: bool = False):
    """Merge attention of the local queries over the key shard ``kv`` into ``acc`` (empty if ``fresh``)."""
    q, q_pos, q_seg = q_side
    k, v, kv_pos, kv_seg = kv

    def rectangle(acc, qs, ks, fresh):
        out, lse = acc
        o, l = st.spec.forward(_cut(q, qs, 1), _cut(k, ks, 1), _cut(v, ks, 1), _cut(q_pos, qs, 0),
                               _cut(kv_pos, ks, 0), _cut(q_seg, qs, 1), _cut(kv_seg, ks, 1))
        if not fresh:  # a fresh accumulator holds nothing to merge with (out 0, lse -inf)
            o, l = merge_attention(_cut(out, qs, 1), _cut(lse, qs, 2), o, l)
        return _paste(out, o.astype(out.dtype), qs, 1), _paste(lse, l.astype(lse.dtype), qs, 2)

    return _by_plan(st, q_pos, kv_pos, rectangle, acc, fresh)


def _backward_step(st: RingStatic, q_side, kv, grads, fresh: bool = False):
    """Add this key shard's share of dQ (local) and dK/dV (travelling) to ``grads`` (zeros if ``fresh``)."""
    q, q_pos, q_seg, out, lse, dout, dlse = q_side
    k, v, kv_pos, kv_seg = kv

    def rectangle(grads, qs, ks, fresh):
        pieces = st.spec.backward(
            _cut(q, qs, 1), _cut(k, ks, 1), _cut(v, ks, 1), _cut(q_pos, qs, 0),
            _cut(kv_pos, ks, 0), _cut(q_seg, qs, 1), _cut(kv_seg, ks, 1), _cut(out, qs, 1),
            _cut(lse, qs, 2), _cut(dout, qs, 1), _cut(dlse, qs, 2),
        )
        return tuple(_paste(g, (piece if fresh else _cut(g, span, 1) + piece).astype(g.dtype), span, 1)
                     for g, piece, span in zip(grads, pieces, (qs, ks, ks)))

    return _by_plan(st, q_pos, kv_pos, rectangle, grads, fresh)


# --- the ring ---------------------------------------------------------------------------


def _rotate(tree, st: RingStatic, n: int):
    return jax.tree.map(lambda x: lax.ppermute(x, st.axis_name, _ring_perm(n)), tree)


def _ring_forward(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    n = lax.axis_size(st.axis_name)
    q_side = (q, q_pos, q_seg)
    # zeros_like keeps q's varying-axes type, which scan carries must preserve.
    acc = (jnp.zeros_like(q, jnp.float32),
           jnp.full_like(rearrange(q[..., 0], "b q h -> b h q"), -jnp.inf, jnp.float32))
    kv = mark_varying((k, v, kv_pos, kv_seg), st.axis_name)

    def step(carry, _):
        kv, acc = carry
        incoming = _rotate(kv, st, n)  # issued first: overlaps the compute below
        return (incoming, _forward_step(st, q_side, kv, acc)), None

    (kv, acc), _ = lax.scan(step, (kv, acc), length=n - 1)
    # Last shard: nothing left to send. On one device it is the only step, whose result is
    # the accumulator itself (no merge into an empty one); on n, the scan's first step merges
    # into the empty one rather than being traced a second time outside the scan.
    return _forward_step(st, q_side, kv, acc, fresh=n == 1)


def _ring_backward(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse):
    n = lax.axis_size(st.axis_name)
    # dlse stays None when the lse has no cotangent, so each step knows it statically.
    q_side = (q, q_pos, q_seg, out, lse, dout, dlse)
    dq = jnp.zeros_like(q, jnp.float32)
    kv = mark_varying((k, v, kv_pos, kv_seg), st.axis_name)
    dkv = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))

    def step(carry, _):
        kv, dq, dkv = carry
        incoming = _rotate(kv, st, n)  # K/V go ahead; their gradients follow once computed
        dq, dk, dv = _backward_step(st, q_side, kv, (dq, *dkv))
        return (incoming, dq, _rotate((dk, dv), st, n)), None

    if n == 1:  # the only step's gradients are the sums (see _ring_forward)
        return _backward_step(st, q_side, kv, (dq, *dkv), fresh=True)
    (kv, dq, dkv), _ = lax.scan(step, (kv, dq, dkv), length=n - 1)
    dq, dk, dv = _backward_step(st, q_side, kv, (dq, *dkv))
    # dK/dV of the shard held last belong to the next device: one hop home.
    dk, dv = _rotate((dk, dv), st, n)
    return dq, dk, dv


# Shard-level ring with explicit positions: ``(out in q.dtype, lse f32)``.
ring_core = attention_vjp(_ring_forward, _ring_backward)


# --- shard body and entry points -----------------------------------------------------------


def ring_on_shards(spec: CallSpec, q, k, v, q_seg, kv_seg, *, axis_name: str, layout: str,
                   q_positions=None, kv_positions=None):
    """The ring over ``axis_name`` on local shards already in ``layout`` order: ``(out, lse)``.

    Positions default to those of ``layout`` (bottom-right aligned over the global
    lengths); USP calls this inside its Ulysses exchange.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    n = sharded.bound_axis_size(axis_name)
    layouts.check_layout(layout)
    # One device holds the whole sequence: its chunks are contiguous, nothing to balance.
    chunks = layouts.num_chunks(layout) if n > 1 else 1
    for name, length in (("q", q_len), ("k", kv_len)):
        if length % chunks:
            raise ValueError(
                f"layout={layout!r} needs an even local length ({chunks} chunks per device), "
                f"got {name} shard length {length}; use a global length that is a multiple of "
                f"{2 * n} or layout='contiguous'."
            )
    _check_key_runs(spec.impl, layout, kv_len, n)
    if q_positions is None or kv_positions is None:
        index = lax.axis_index(axis_name)
        # Bottom-right alignment of the global lengths, as in a single-device call.
        offset = (kv_len - q_len) * n
        if q_positions is None:
            q_positions = layouts.local_positions(layout, q_len, n, index, xp=jnp) + offset
        if kv_positions is None:
            kv_positions = layouts.local_positions(layout, kv_len, n, index, xp=jnp)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    return ring_core(RingStatic(spec, axis_name, chunks), q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _check_key_runs(impl, layout: str, kv_len: int, n: int) -> None:
    """A step that needs aligned runs of ``impl.key_runs`` positions (landmark blocks) gets them whole."""
    runs = impl.key_runs
    if runs == 1:
        return
    pieces = layouts.position_runs(layout, n)  # the global sequence's runs of consecutive positions
    if pieces is None:
        raise ValueError(f"impl={impl.name!r} needs its keys in whole runs of {runs} consecutive positions, which "
                         f"layout='striped' deals out one token per device; use layout='zigzag' or 'contiguous'.")
    chunk = kv_len * n // pieces
    if chunk % runs:
        raise ValueError(f"impl={impl.name!r} needs each ring chunk to hold whole runs of {runs} positions, got "
                         f"chunks of {chunk} keys ({pieces // n} per device, {n} devices, layout={layout!r}); "
                         f"use a sequence length that is a multiple of {runs * pieces}.")


def _ring_body(spec: CallSpec, q, k, v, q_seg, kv_seg, *, axis_name, layout, convert):
    """Shard body of :func:`ring_attention` (see :mod:`lca.attention.sharded`)."""
    attend = functools.partial(ring_on_shards, spec, axis_name=axis_name, layout=layout)
    return sharded.in_layout(attend, layout, axis_name, convert, q, k, v, q_seg, kv_seg)


def ring_attention_shard(
    q, k, v, *, axis_name: str, layout: str = "zigzag", q_positions=None, kv_positions=None,
    segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl="blockwise",
    block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False,
):
    """Ring attention on local shards, inside your own ``jax.shard_map``.

    Args:
      q: local ``[batch, q_len / n, num_heads, head_dim]`` shard; k, v: local
        ``[batch, kv_len / n, num_kv_heads, head_dim]`` shards, all in ``layout``
        order over the ``n`` devices of ``axis_name``.
      layout: ``"zigzag"``, ``"contiguous"`` or ``"striped"``: which global
        tokens this shard holds (see :mod:`lca.parallel.layout`). Gives the
        default positions and the chunking used to skip masked work.
      q_positions, kv_positions: optional int32 ``[q_len / n]``, ``[kv_len / n]``
        global positions of the local tokens (mask frame), overriding ``layout``.
      segment_ids: local ``[batch, len / n]`` ids, or a pair (q, kv).
      causal, window, softcap, scale: as in ``reference_attention``.
      impl: the per-step local implementation: a name in
        ``lca.attention.impl.IMPLS`` with a step (``"blockwise"``, ``"pallas"``)
        or a ``LocalImpl``.
      block_q, block_kv: its forward tiles; block_q_bwd, block_kv_bwd: its
        backward tiles (None: the implementation's defaults; see
        ``lca.attention.BlockSizes``).

    Returns:
      local ``out [batch, q_len / n, num_heads, head_dim]`` in q's dtype (and
      ``lse [batch, num_heads, q_len / n]`` f32 with ``return_lse``).
    """
    spec, q_seg, kv_seg = sharded.validate_shard(
        q, k, v, segment_ids=segment_ids, causal=causal, window=window, softcap=softcap,
        scale=scale, impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    out, lse = ring_on_shards(spec, q, k, v, q_seg, kv_seg, axis_name=axis_name, layout=layout,
                              q_positions=q_positions, kv_positions=kv_positions)
    return (out, lse) if return_lse else out


def ring_attention(
    q, k, v, *, mesh, axis: str = "context", causal: bool = False, segment_ids=None,
    window: int | None = None, softcap: float | None = None, scale: float | None = None,
    layout: str = "zigzag", input_layout: str = "natural", impl="blockwise",
    block_q: int | None = None, block_kv: int | None = None,
    block_q_bwd: int | None = None, block_kv_bwd: int | None = None, return_lse: bool = False,
    batch_axes=None,
):
    """Exact attention with the sequence sharded over mesh axis ``axis``.

    Takes global arrays (sharded any way or not at all, inside or outside
    ``jax.jit``, differentiable eagerly too), runs the ring on
    ``n = mesh.shape[axis]`` devices and returns the output with q's sharding.
    Memory per device is O(T / n).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``; k, v: ``[batch, kv_len,
        num_kv_heads, head_dim]`` (GQA/MQA rotate only the kv heads).
      mesh: a ``jax.sharding.Mesh`` (Explicit or Auto axes), e.g.
        ``lca.parallel.make_mesh(data=2, context=4)``.
      axis: the mesh axis the sequence is split over.
      causal, segment_ids, window, softcap, scale: as in ``reference_attention``
        (packed segments may cross shard boundaries).
      layout: how tokens are spread over the ring: ``"zigzag"`` (balanced causal
        work; length a multiple of ``2n``), ``"contiguous"`` or ``"striped"``.
      input_layout: ``"natural"`` (q/k/v/segment_ids in sequence order; they are
        moved to ``layout`` and back with collectives on the shards) or the same
        value as ``layout``: the data pipeline already reordered tokens with
        ``lca.parallel.to_layout`` and the output stays in that order.
      impl, block_q, block_kv, block_q_bwd, block_kv_bwd: per-step local
        attention (a name or a ``LocalImpl`` with a step, e.g.
        ``lca.attention.landmark_step(64)`` for landmark attention) and its
        forward and backward tiles (positive ints; None: the implementation's
        defaults).
      return_lse: also return ``lse [batch, num_heads, q_len]`` float32.
      batch_axes: mesh axes sharding the batch; default: every other axis of
        size > 1 that divides it (``()`` to replicate the batch).

    Returns:
      ``out`` like q (and ``lse``), in the order of the inputs.
    """
    n = seqshard.mesh_axis_size(mesh, axis)
    spec, segs = sharded.validate_global(
        q, k, v, n=n, axis=axis, layout=layout, input_layout=input_layout,
        segment_ids=segment_ids, causal=causal, window=window, softcap=softcap, scale=scale,
        impl=impl, blocks=inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
        return_lse=return_lse)
    return sharded.run_global(_ring_body, spec, q, k, v, segs, mesh=mesh, seq_axes=(axis,),
                              layout=layout, input_layout=input_layout,
                              axes=dict(axis_name=axis), batch_axes=batch_axes,
                              return_lse=return_lse)


def ring_schedule(layout: str, seq_len: int, n: int, *, causal: bool = True,
                  window: int | None = None, block: int | None = None) -> np.ndarray:
    """``[n, n]`` (device, step) count of the tiles the ring computes for self-attention.

    Evaluates the skip predicate the ring uses (``Mask.block_visible`` on each
    chunk pair's position range) on the positions of ``layout``. With ``block``
    it also applies it to the ``block x block`` tiles of each visible chunk pair,
    as the blockwise implementation does, and counts tiles; else chunk pairs.
    """
    local = layouts.check_length(layout, seq_len, n)
    chunks = layouts.num_chunks(layout)
    mask = Mask(causal=causal, window=window)

    def tiles(positions):
        if block is None:
            return [positions]
        return [positions[i:i + block] for i in range(0, positions.size, block)]

    def pair_work(qp, kp):
        if not bool(_pair_visible(mask, qp, kp)):
            return 0
        return sum(bool(_pair_visible(mask, qt, kt)) for qt in tiles(qp) for kt in tiles(kp))

    counts = np.zeros((n, n), np.int64)
    for dev in range(n):
        q_parts = np.split(layouts.local_positions(layout, local, n, dev), chunks)
        for step in range(n):
            kv_parts = np.split(layouts.local_positions(layout, local, n, (dev - step) % n), chunks)
            counts[dev, step] = sum(pair_work(qp, kp) for qp in q_parts for kp in kv_parts)
    return counts
