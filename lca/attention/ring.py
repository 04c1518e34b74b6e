"""Ring attention: exact attention over a sequence sharded across a mesh axis.

Each of the ``n`` devices of the context axis keeps its query shard and passes
its key/value shard around a ring with ``lax.ppermute``. At every step a device
attends its queries to the key chunk it currently holds, through the local
implementation ``impl`` (blockwise now, Pallas later), and merges the partial
result into its running ``(out, lse)`` in float32 with :func:`merge_attention`.
The transfer of the next chunk is issued before the current one is computed so
the collective overlaps compute, and there is no transfer after the last step.

Masking is purely positional: every token carries its global position, so any
layout (``zigzag``, ``contiguous``, ``striped``) is correct under the one
:class:`Mask`, and a (query chunk, key chunk) pair that the mask hides entirely
(a causal chunk in the future, a window out of reach) is skipped with
``lax.cond``. Zigzag gives every device two chunks, ``i`` and ``2n-1-i``, and
splits the per-step work by chunk pairs, so all devices do the same causal work.

The backward is a ``jax.custom_vjp`` that runs the ring again: K/V travel as in
the forward and their gradients dK/dV travel with them, each step adding the
exact piece ``impl.backward`` computes from the *global* output and lse; one
extra hop brings dK/dV home. Memory per device is O(T/n): nothing of the full
sequence length is ever gathered.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax

from lca.attention import inputs
from lca.attention.blockwise import BlockSizes
from lca.attention.impl import get_impl
from lca.attention.inputs import LogitOptions
from lca.attention.mask import Mask
from lca.attention.merge import merge_attention
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard


@dataclasses.dataclass(frozen=True)
class RingStatic:
    """Everything static about one ring call (hashable: a ``custom_vjp`` nondiff arg)."""

    axis_name: str
    mask: Mask
    logit: LogitOptions
    impl: str
    blocks: BlockSizes | None
    chunks: int  # runs of consecutive positions per shard (zigzag: 2)


def resolve_blocks(impl: str, block_q, block_kv) -> BlockSizes | None:
    """User block sizes, else the implementation's defaults (None: its own choice)."""
    default = get_impl(impl).default_blocks
    if block_q is None and block_kv is None:
        return default
    base = default or BlockSizes()
    return BlockSizes(block_q or base.block_q, block_kv or base.block_kv)


def _split(x, parts: int, axis: int):
    return [x] if x is None or parts == 1 else jnp.split(x, parts, axis=axis)


def _pieces(x, parts: int, axis: int):
    return [None] * parts if x is None else _split(x, parts, axis)


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _pair_visible(mask: Mask, q_pos, kv_pos):
    """Can any query of this chunk see any key of that chunk (from position ranges)?"""
    if mask.is_full:
        return True
    return mask.block_visible(q_pos.min(), q_pos.max(), kv_pos.min(), kv_pos.max())


def _when(visible, fn, carry):
    return fn(carry) if visible is True else lax.cond(visible, fn, lambda c: c, carry)


# --- one ring step --------------------------------------------------------------------


def _forward_step(st: RingStatic, q_parts, kv, acc):
    """Merge attention of every query chunk over every key chunk of ``kv`` into ``acc``."""
    k, v, kv_pos, kv_seg = kv
    local = get_impl(st.impl)
    kv_parts = list(zip(_split(k, st.chunks, 1), _split(v, st.chunks, 1),
                        _split(kv_pos, st.chunks, 0), _pieces(kv_seg, st.chunks, 1)))
    new_acc = []
    for (q_c, qp_c, qs_c), acc_c in zip(q_parts, acc):
        for k_c, v_c, kp_c, ks_c in kv_parts:

            def attend(a, q_c=q_c, qp_c=qp_c, qs_c=qs_c, k_c=k_c, v_c=v_c, kp_c=kp_c, ks_c=ks_c):
                out, lse = local.forward(q_c, k_c, v_c, qp_c, kp_c, qs_c, ks_c,
                                         mask=st.mask, logit=st.logit, blocks=st.blocks)
                return merge_attention(a[0], a[1], out, lse)

            acc_c = _when(_pair_visible(st.mask, qp_c, kp_c), attend, acc_c)
        new_acc.append(acc_c)
    return new_acc


def _backward_step(st: RingStatic, q_parts, kv, grads):
    """Add this key chunk's share of dQ (local) and dK/dV (travelling) to ``grads``."""
    k, v, kv_pos, kv_seg = kv
    dq, dk, dv = grads
    local = get_impl(st.impl)
    kv_parts = list(zip(_split(k, st.chunks, 1), _split(v, st.chunks, 1),
                        _split(kv_pos, st.chunks, 0), _pieces(kv_seg, st.chunks, 1)))
    dk, dv = _split(dk, st.chunks, 1), _split(dv, st.chunks, 1)
    dq = list(dq)
    for a, (q_c, qp_c, qs_c, out_c, lse_c, do_c, dlse_c) in enumerate(q_parts):
        for c, (k_c, v_c, kp_c, ks_c) in enumerate(kv_parts):

            def grad(g, q_c=q_c, qp_c=qp_c, qs_c=qs_c, out_c=out_c, lse_c=lse_c, do_c=do_c,
                     dlse_c=dlse_c, k_c=k_c, v_c=v_c, kp_c=kp_c, ks_c=ks_c):
                gq, gk, gv = local.backward(q_c, k_c, v_c, qp_c, kp_c, qs_c, ks_c, out_c, lse_c,
                                            do_c, dlse_c, mask=st.mask, logit=st.logit,
                                            blocks=st.blocks)
                return g[0] + gq, g[1] + gk, g[2] + gv

            dq[a], dk[c], dv[c] = _when(_pair_visible(st.mask, qp_c, kp_c), grad,
                                        (dq[a], dk[c], dv[c]))
    return dq, jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1)


# --- the ring ---------------------------------------------------------------------------


def _rotate(tree, st: RingStatic, n: int):
    return jax.tree.map(lambda x: lax.ppermute(x, st.axis_name, _ring_perm(n)), tree)


def _ring_forward(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    n = lax.axis_size(st.axis_name)
    q_parts = list(zip(_split(q, st.chunks, 1), _split(q_pos, st.chunks, 0),
                       _pieces(q_seg, st.chunks, 1)))
    acc = []
    for q_c, _, _ in q_parts:
        # zeros_like keeps q's varying-axes type, which scan carries must preserve.
        out0 = jnp.zeros_like(q_c, jnp.float32)
        lse0 = jnp.full_like(rearrange(q_c[..., 0], "b q h -> b h q"), -jnp.inf, jnp.float32)
        acc.append((out0, lse0))
    kv = seqshard.vary((k, v, kv_pos, kv_seg), st.axis_name)

    def step(carry, _):
        kv, acc = carry
        incoming = _rotate(kv, st, n)  # issued first: overlaps the compute below
        return (incoming, _forward_step(st, q_parts, kv, acc)), None

    (kv, acc), _ = lax.scan(step, (kv, acc), length=n - 1)
    acc = _forward_step(st, q_parts, kv, acc)  # last chunk: nothing left to send
    out = jnp.concatenate([o for o, _ in acc], axis=1)
    lse = jnp.concatenate([l for _, l in acc], axis=2)
    return out, lse


def _ring_backward(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse):
    n = lax.axis_size(st.axis_name)
    if dlse is None:
        dlse = jnp.zeros_like(lse)
    q_parts = list(zip(_split(q, st.chunks, 1), _split(q_pos, st.chunks, 0),
                       _pieces(q_seg, st.chunks, 1), _split(out, st.chunks, 1),
                       _split(lse, st.chunks, 2), _split(dout, st.chunks, 1),
                       _split(dlse, st.chunks, 2)))
    dq = [jnp.zeros_like(q_c, jnp.float32) for q_c, *_ in q_parts]
    kv = seqshard.vary((k, v, kv_pos, kv_seg), st.axis_name)
    dkv = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))

    def step(carry, _):
        kv, dq, dkv = carry
        incoming = _rotate(kv, st, n)  # K/V go ahead; their gradients follow once computed
        dq, dk, dv = _backward_step(st, q_parts, kv, (dq, *dkv))
        return (incoming, dq, _rotate((dk, dv), st, n)), None

    (kv, dq, dkv), _ = lax.scan(step, (kv, dq, dkv), length=n - 1)
    dq, dk, dv = _backward_step(st, q_parts, kv, (dq, *dkv))
    # dK/dV of the chunk held last belong to the next device: one hop home.
    dk, dv = _rotate((dk, dv), st, n)
    return jnp.concatenate(dq, axis=1), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_core(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Shard-level ring with explicit positions: ``(out in q.dtype, lse f32)``."""
    out, lse = _ring_forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out.astype(q.dtype), lse


def _ring_core_fwd(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = ring_core(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_core_bwd(st, residuals, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _ring_backward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)
    no_grad = jax.tree.map(lambda _: None, (q_pos, kv_pos, q_seg, kv_seg))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad)


ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


# --- shard-level API ------------------------------------------------------------------


def bound_axis_size(axis_name, *, arg: str = "axis_name") -> int:
    """Size of a ``shard_map`` axis, or a ``ValueError`` when it is not bound here."""
    try:
        return lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"{arg}={axis_name!r} is not a mesh axis of the enclosing jax.shard_map ({err}); "
            f"call this inside shard_map over a mesh with that axis, or use the global form "
            f"with mesh=..."
        ) from None


def ring_attention_shard(
    q, k, v, *, axis_name: str, layout: str = "zigzag", q_positions=None, kv_positions=None,
    segment_ids=None, causal: bool = False, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, impl: str = "blockwise",
    block_q: int | None = None, block_kv: int | None = None, return_lse: bool = False,
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
      impl: local implementation (``lca.attention.impl.get_impl``).
      block_q, block_kv: its block sizes (default: the implementation's).

    Returns:
      local ``out [batch, q_len / n, num_heads, head_dim]`` in q's dtype (and
      ``lse [batch, num_heads, q_len / n]`` f32 with ``return_lse``).
    """
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    n = bound_axis_size(axis_name)
    layouts.check_layout(layout)
    chunks = layouts.num_chunks(layout)
    for name, length in (("q", q_len), ("k", kv_len)):
        if length % chunks:
            raise ValueError(
                f"layout={layout!r} needs an even local length ({chunks} chunks per device), "
                f"got {name} shard length {length}; use a global length that is a multiple of "
                f"{2 * n} or layout='contiguous'."
            )
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    if q_positions is None or kv_positions is None:
        index = lax.axis_index(axis_name)
        # Bottom-right alignment of the global lengths, as in a single-device call.
        offset = (kv_len - q_len) * n
        if q_positions is None:
            q_positions = layouts.local_positions(layout, q_len, n, index, xp=jnp) + offset
        if kv_positions is None:
            kv_positions = layouts.local_positions(layout, kv_len, n, index, xp=jnp)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    st = RingStatic(
        axis_name=axis_name,
        mask=inputs.make_mask(causal, window),
        logit=inputs.logit_options(d, scale, softcap),
        impl=get_impl(impl).name,
        blocks=resolve_blocks(impl, block_q, block_kv),
        chunks=chunks,
    )
    out, lse = ring_core(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out


# --- global API -----------------------------------------------------------------------


def validate_global(q, k, v, *, n: int, axis, layout: str, input_layout: str, segment_ids,
                    causal, window, softcap, scale, impl, group: int = 1):
    """Trace-time checks shared by the global entry points, with the global shapes.

    ``n`` devices carry the layout over mesh axis ``axis``; each of their shards
    is split ``group`` ways more (USP's Ulysses axis). Returns ``(q_seg, kv_seg)``
    (``None``s without segments).
    """
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    layouts.check_input_layout(input_layout, layout)
    for name, length in (("q length", q_len), ("kv length", kv_len)):
        layouts.check_global_length(layout, input_layout, length, n, name=name, axis=axis)
        if length % (n * group):
            raise ValueError(
                f"{name} {length} must be a multiple of {n * group} = {n} ring shards (axis "
                f"{axis!r}) x {group} Ulysses shards; pad it to a multiple of "
                f"{n * group * layouts.required_multiple(layout, 1)}."
            )
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    inputs.make_mask(causal, window)
    inputs.logit_options(d, scale, softcap)
    get_impl(impl)
    return segs if segs is not None else (None, None)


@dataclasses.dataclass(frozen=True)
class _Global:
    axis: str
    layout: str
    input_layout: str
    kwargs: tuple  # shard-level keyword arguments, as sorted items


def _global_shard(cfg: _Global, q, k, v, q_seg, kv_seg):
    """Per-shard body of :func:`ring_attention`: to the layout, ring, back."""
    convert = cfg.input_layout == "natural"
    to = functools.partial(layouts.shard_to_layout, layout=cfg.layout, axis_name=cfg.axis)
    if convert:
        q, k, v, q_seg, kv_seg = jax.tree.map(to, (q, k, v, q_seg, kv_seg))
    segs = None if q_seg is None else (q_seg, kv_seg)
    out, lse = ring_attention_shard(q, k, v, axis_name=cfg.axis, layout=cfg.layout,
                                    segment_ids=segs, return_lse=True, **dict(cfg.kwargs))
    if convert:
        out = layouts.shard_from_layout(out, cfg.layout, cfg.axis)
        lse = layouts.shard_from_layout(lse, cfg.layout, cfg.axis, seq_axis=2)
    return out, lse


def ring_attention(
    q, k, v, *, mesh, axis: str = "context", causal: bool = False, segment_ids=None,
    window: int | None = None, softcap: float | None = None, scale: float | None = None,
    layout: str = "zigzag", input_layout: str = "natural", impl: str = "blockwise",
    block_q: int | None = None, block_kv: int | None = None, return_lse: bool = False,
    batch_axes=None,
):
    """Exact attention with the sequence sharded over mesh axis ``axis``.

    Takes global arrays (sharded any way or not at all, inside or outside
    ``jax.jit``), runs the ring on ``n = mesh.shape[axis]`` devices and returns
    the output with q's sharding. Memory per device is O(T / n).

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
      impl, block_q, block_kv: per-step local attention and its block sizes.
      return_lse: also return ``lse [batch, num_heads, q_len]`` float32.
      batch_axes: mesh axes sharding the batch; default: every other axis of
        size > 1 that divides it (``()`` to replicate the batch).

    Returns:
      ``out`` like q (and ``lse``), in the order of the inputs.
    """
    n = seqshard.mesh_axis_size(mesh, axis)
    segs = validate_global(q, k, v, n=n, axis=axis, layout=layout, input_layout=input_layout,
                           segment_ids=segment_ids, causal=causal, window=window,
                           softcap=softcap, scale=scale, impl=impl)
    cfg = _Global(axis=axis, layout=layout, input_layout=input_layout, kwargs=tuple(sorted(dict(
        causal=causal, window=window, softcap=softcap, scale=scale, impl=impl,
        block_q=block_q, block_kv=block_kv).items())))
    out, lse = seqshard.run(_global_shard, cfg, mesh, (axis,),
                            seqshard.batch_axes(mesh, (axis,), q.shape[0], batch_axes),
                            q, k, v, *segs)
    out = seqshard.match_sharding(out, q, mesh)
    return (out, lse) if return_lse else out


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
