"""Memory-efficient blockwise attention: O(n) memory in the forward and the backward.

The forward walks query blocks and, for each, key blocks with an online softmax
(Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory"; FlashAttention),
never holding a ``[q_len, kv_len]`` array. The backward is a ``jax.custom_vjp``
that recomputes each block from the saved output and log-sum-exp
(FlashAttention-2), so nothing quadratic is saved for the gradient either.

Key blocks that the causal/window mask or the segment ids hide entirely are
skipped with ``lax.cond`` on the block's position and segment-id ranges (see
``Mask.block_visible`` and ``segment_block_visible``), so a causal pass does about
half the work of a full one, and a packed one only the work of its documents.

Keys and values a query cannot see never reach it, even when they are NaN or
inf: the loops multiply only the operands of ``lca.attention.nonfinite``.

``blockwise_forward`` / ``blockwise_backward`` are the building blocks that ring
attention reuses for each step: they take explicit token positions, return the
float32 output with its lse, and take the *global* lse in the backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from einops import rearrange
from jax import lax

from lca.attention import inputs, nonfinite
from lca.attention.blocks import BlockSizes
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask, segment_block_full, segment_block_visible
from lca.attention.tiling import Tiling
from lca.attention.vjp import attention_vjp
from lca.parallel.vma import varying_like


# blockwise's own sizes for what a caller leaves as None.
DEFAULT_BLOCKS = BlockSizes(512, 512)


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    logit: LogitOptions
    blocks: BlockSizes


def _tiling(q_len: int, kv_len: int, blocks: BlockSizes | None, backward: bool) -> Tiling:
    """Blocks with defaults filled in, shortened to the sequence lengths."""
    blocks = (blocks or BlockSizes()).or_defaults(DEFAULT_BLOCKS)
    blocks = blocks.backward if backward else blocks
    return Tiling(q_len, kv_len, min(blocks.block_q, q_len), min(blocks.block_kv, kv_len))


def _q_blocks(tiling: Tiling, x, pattern_in: str, pattern_out: str, **sizes):
    """Pad the query axis (axis 1 of ``x``) and split it into leading blocks."""
    return rearrange(tiling.pad_q(x), f"{pattern_in} -> {pattern_out}", t=tiling.block_q, **sizes)


def _kv_side(tiling: Tiling, k, v, kv_pos, kv_seg):
    """Scan inputs over key blocks: k/v blocks, positions, validity, segments, ranges, completeness.

    Segments are ``(ids [n, b, t], least [n, b], greatest [n, b])`` or None.
    """
    k_blk, v_blk = (
        rearrange(tiling.pad_kv(x), "b (n t) h d -> n b h t d", t=tiling.block_kv) for x in (k, v)
    )
    pos = tiling.kv_position_blocks(kv_pos)
    valid = (jnp.arange(tiling.kv_padded) < tiling.kv_len).reshape(tiling.num_kv, tiling.block_kv)
    seg = None
    if kv_seg is not None:
        seg = _with_ranges(rearrange(tiling.pad_kv(kv_seg), "b (n t) -> n b t", t=tiling.block_kv))
    # Which blocks hold no padding (None: none is padded).
    complete = None if tiling.kv_padded == tiling.kv_len else valid.all(axis=1)
    return k_blk, v_blk, pos, valid, seg, pos.min(axis=1), pos.max(axis=1), complete


def _q_positions(tiling: Tiling, q_pos):
    pos = tiling.q_position_blocks(q_pos)
    return pos, pos.min(axis=1), pos.max(axis=1)


def _q_segments(tiling: Tiling, q_seg):
    """``(ids [n, b, t], least [n, b], greatest [n, b])`` of the query blocks, or None."""
    if q_seg is None:
        return None
    return _with_ranges(rearrange(tiling.pad_q(q_seg), "b (n t) -> n b t", t=tiling.block_q))


def _with_ranges(seg):
    """Block segment ids ``[n, b, t]`` with their per-row ranges (padding's id 0 only widens them)."""
    return seg, seg.min(axis=-1), seg.max(axis=-1)


def _block_logits(q_blk, k_blk, q_pos, kv_pos, kv_valid, q_seg, kv_seg, mask, logit, masked):
    """Masked logits ``[b, hk, g, tq, tk]`` of one block pair, and the unmasked capped ones.

    ``q_blk [b, hk, g, tq, d]``, ``k_blk [b, hk, tk, d]``: head-major, so the
    batched matmuls need no transposes inside the loops. ``masked=False``: the
    caller knows every pair is visible.
    """
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    capped = logit.apply(scores)
    if not masked:
        return capped, capped
    visible = (mask.visible(q_pos, kv_pos) & kv_valid[None, :])[None]  # [1, tq, tk]
    if q_seg is not None:
        visible = visible & (q_seg[:, :, None] == kv_seg[:, None, :])
    return jnp.where(visible[:, None, None], capped, -jnp.inf), capped


def _split_segments(q_seg, kv_seg):
    """``(q ids, kv ids, ranges)`` of a tile from the blocks' ``(ids, least, greatest)`` (or None)."""
    if q_seg is None:
        return None, None, None
    (q_ids, q_lo, q_hi), (kv_ids, kv_lo, kv_hi) = q_seg, kv_seg
    return q_ids, kv_ids, (q_lo, q_hi, kv_lo, kv_hi)


def _tile_visible(mask: Mask, q_lo, q_hi, kv_lo, kv_hi, segments):
    """Could any pair of the tile be visible (True when that is known at trace time)?

    ``segments``: None or the ``(least, greatest)`` segment ids of the query
    block and of the key block, each ``[b]``.
    """
    visible = True if mask.is_full else mask.block_visible(q_lo, q_hi, kv_lo, kv_hi)
    if segments is not None:
        visible = segment_block_visible(*segments) & visible
    return visible


def _run_tile(mask: Mask, q_lo, q_hi, kv_lo, kv_hi, kv_complete, segments, compute, carry):
    """``compute(carry, masked=...)`` for one tile, or ``carry`` when the mask hides all of it.

    A tile the mask hides none of (most tiles of a long causal pass, the inside of
    a packed document) runs without the mask: no position compare, no select.
    ``kv_complete`` (None: no padding) says the key block holds no padding.
    """
    masked = functools.partial(compute, masked=True)
    unmasked = functools.partial(compute, masked=False)
    visible = _tile_visible(mask, q_lo, q_hi, kv_lo, kv_hi, segments)
    full = True if mask.is_full else mask.block_full(q_lo, q_hi, kv_lo, kv_hi)
    if segments is not None:
        full = segment_block_full(*segments) & full
    if kv_complete is not None:
        full = kv_complete & full
    if full is True:
        return unmasked(carry)
    if visible is True:
        return lax.cond(full, unmasked, masked, carry)
    # full implies visible, so the index is 0 (hidden), 1 (partly) or 2 (all visible).
    index = visible.astype(jnp.int32) + full.astype(jnp.int32)
    return lax.switch(index, [lambda c: c, masked, unmasked], carry)


def blockwise_forward(
    q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, mask: Mask, logit: LogitOptions,
    blocks: BlockSizes | None = None,
):
    """Attention of ``q`` over ``k, v`` with explicit positions, in O(n) memory.

    Args:
      q: ``[b, q_len, h, d]``; k, v: ``[b, kv_len, h_kv, d]``.
      q_pos, kv_pos: int32 ``[q_len]``, ``[kv_len]`` token positions (mask frame).
      q_seg, kv_seg: int32 ``[b, q_len]``, ``[b, kv_len]`` or both None.
      blocks: tile sizes; None or None fields: ``DEFAULT_BLOCKS``.

    Returns:
      ``out [b, q_len, h, d]`` float32 (0 for rows with no visible key) and
      ``lse [b, h, q_len]`` float32 (``-inf`` for those rows).
    """
    b, q_len, h, d = q.shape
    kv_len, h_kv = k.shape[1], k.shape[2]
    tiling = _tiling(q_len, kv_len, blocks, backward=False)
    q_blocks = _q_blocks(tiling, q, "b (n t) (hk g) d", "n b hk g t d", hk=h_kv)
    q_pos_blk, q_lo, q_hi = _q_positions(tiling, q_pos)
    q_seg_blk = _q_segments(tiling, q_seg)
    kv_xs = _kv_side(tiling, *nonfinite.forward_operands(k, v), kv_pos, kv_seg)
    g = h // h_kv
    stats_shape = (b, h_kv, g, tiling.block_q)

    def one_q_block(_, q_xs):
        q_blk, qp, qseg, qlo, qhi = q_xs

        def kv_step(carry, kv_block):
            k_blk, v_blk, kp, kvalid, kseg, klo, khi, kcomplete = kv_block
            qs, ks, seg_ranges = _split_segments(qseg, kseg)

            def compute(carry, masked):
                m, l, acc = carry
                logits, _ = _block_logits(q_blk, k_blk, qp, kp, kvalid, qs, ks, mask, logit,
                                          masked)
                m_new = jnp.maximum(m, logits.max(axis=-1))
                # Unmasked logits are finite, so is their max; masked rows may be all -inf.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if masked else m_new
                p = jnp.exp(logits - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + p.sum(axis=-1)
                pv = jnp.einsum(
                    "bhgqk,bhkd->bhgqd", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32,
                )
                return m_new, l, alpha[..., None] * acc + pv

            tile = _run_tile(mask, qlo, qhi, klo, khi, kcomplete, seg_ranges, compute, carry)
            return tile, None

        init = varying_like(
            (
                jnp.full(stats_shape, -jnp.inf, jnp.float32),
                jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (d,), jnp.float32),
            ),
            q, k, v, q_pos, kv_pos, q_seg, kv_seg,
        )
        (m, l, acc), _ = lax.scan(kv_step, init, kv_xs)
        has_key = l > 0
        l_safe = jnp.where(has_key, l, 1.0)
        lse = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)
        return None, (acc / l_safe[..., None], lse)

    _, (out, lse) = lax.scan(one_q_block, None, (q_blocks, q_pos_blk, q_seg_blk, q_lo, q_hi))
    out = rearrange(out, "n b hk g t d -> b (n t) (hk g) d")[:, :q_len]
    lse = rearrange(lse, "n b hk g t -> b (hk g) (n t)")[..., :q_len]
    return out, lse


def blockwise_backward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None, *, mask: Mask,
    logit: LogitOptions, blocks: BlockSizes | None = None,
):
    """Gradients of ``(out, lse) = attention(q, k, v)`` by block recomputation.

    ``out``/``lse`` are the *final* output and log-sum-exp of the queries (for a
    ring step that is the result over all keys, not just these), so the
    gradients for this key set are exact pieces of the global ones.

    Args:
      out, dout: ``[b, q_len, h, d]``; lse, dlse: ``[b, h, q_len]`` (dlse may be None).

    Returns:
      ``(dq [b, q_len, h, d], dk [b, kv_len, h_kv, d], dv [b, kv_len, h_kv, d])`` float32.
    """
    b, q_len, h, d = q.shape
    kv_len, h_kv = k.shape[1], k.shape[2]
    tiling = _tiling(q_len, kv_len, blocks, backward=True)
    # delta_i = sum_j p_ij dp_ij = dout_i . out_i; an lse cotangent adds p_ij * dlse_i to ds.
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def row_blocks(x):  # [b, h, q_len] -> [n, b, hk, g, t]
        return _q_blocks(
            tiling, rearrange(x, "b h q -> b q h"), "b (n t) (hk g)", "n b hk g t", hk=h_kv
        )

    q_xs = (
        jnp.arange(tiling.num_q),
        _q_blocks(tiling, q, "b (n t) (hk g) d", "n b hk g t d", hk=h_kv),
        _q_blocks(tiling, dout, "b (n t) (hk g) d", "n b hk g t d", hk=h_kv),
        row_blocks(lse_safe),
        row_blocks(delta),
        *_q_positions(tiling, q_pos),
        _q_segments(tiling, q_seg),
    )
    kv_xs = _kv_side(tiling, *nonfinite.backward_operands(k, v), kv_pos, kv_seg)
    varying = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)
    dq_init = varying_like(
        jnp.zeros((tiling.num_q, b, h_kv, h // h_kv, tiling.block_q, d), jnp.float32), *varying
    )

    def one_kv_block(dq_all, kv_block):
        k_blk, v_blk, kp, kvalid, kseg, klo, khi, _ = kv_block

        def q_step(carry, q_block):
            i, q_blk, do_blk, lse_blk, delta_blk, qp, qlo, qhi, qseg = q_block
            qs, ks, seg_ranges = _split_segments(qseg, kseg)

            def compute(carry):
                dk, dv, dq_all = carry
                logits, capped = _block_logits(q_blk, k_blk, qp, kp, kvalid, qs, ks, mask, logit,
                                               masked=True)
                p = jnp.exp(logits - lse_blk[..., None])
                dv = dv + jnp.einsum(
                    "bhgqk,bhgqd->bhkd", p.astype(do_blk.dtype), do_blk,
                    preferred_element_type=jnp.float32,
                )
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_blk[..., None])
                if logit.softcap is not None:
                    ds = ds * (1.0 - jnp.square(capped / logit.softcap))
                ds = (ds * logit.scale).astype(q_blk.dtype)
                dq_i = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_blk, preferred_element_type=jnp.float32)
                dq_all = dq_all.at[i].add(dq_i)
                dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_blk, preferred_element_type=jnp.float32)
                return dk, dv, dq_all

            # Skip hidden tiles only: a three-way switch (as in the forward) with the
            # whole dQ in its carry makes XLA copy dQ per tile, which costs more than
            # the mask it would save.
            visible = _tile_visible(mask, qlo, qhi, klo, khi, seg_ranges)
            if visible is True:
                return compute(carry), None
            return lax.cond(visible, compute, lambda c: c, carry), None

        zeros_kv = varying_like(jnp.zeros((b, h_kv, tiling.block_kv, d), jnp.float32), *varying)
        (dk, dv, dq_all), _ = lax.scan(q_step, (zeros_kv, zeros_kv, dq_all), q_xs)
        return dq_all, (dk, dv)

    dq_all, (dk, dv) = lax.scan(one_kv_block, dq_init, kv_xs)
    dq = rearrange(dq_all, "n b hk g t d -> b (n t) (hk g) d")[:, :q_len]
    dk = rearrange(dk, "n b h t d -> b (n t) h d")[:, :kv_len]
    dv = rearrange(dv, "n b h t d -> b (n t) h d")[:, :kv_len]
    return dq, dk, dv


def _forward(static: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                             mask=static.mask, logit=static.logit, blocks=static.blocks)


def _backward(static: _Static, *args):
    return blockwise_backward(*args, mask=static.mask, logit=static.logit, blocks=static.blocks)


# ``(out in q.dtype, lse f32)``, differentiable by the recomputing backward.
_attention = attention_vjp(_forward, _backward)


def blockwise_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_q: int | None = 512,
    block_kv: int | None = 512,
    block_q_bwd: int | None = None,
    block_kv_bwd: int | None = None,
    return_lse: bool = False,
    q_positions=None,
    kv_positions=None,
):
    """Memory-efficient attention with the exact semantics of ``reference_attention``.

    Memory is O(q_len + kv_len) in the forward and the backward: only
    ``[block_q, block_kv]`` logits exist at a time, and the custom backward
    recomputes them from the saved output and lse. Key blocks hidden by the
    causal/window mask are skipped.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``; GQA/MQA never repeat K/V.
      causal, segment_ids, window, softcap, scale, q_positions, kv_positions:
        as in ``reference_attention``.
      block_q, block_kv: block lengths, positive integers (None: 512; clamped to
        the sequence lengths; any lengths work, the remainder is padded and masked).
      block_q_bwd, block_kv_bwd: the backward's block lengths (None: the forward's).
      return_lse: also return ``lse [batch, num_heads, q_len]`` float32
        (differentiable too).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype (and ``lse``).
    """
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    static = _Static(
        mask=inputs.make_mask(causal, window),
        logit=inputs.logit_options(d, scale, softcap),
        blocks=BlockSizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
    )
    q_seg, kv_seg = segs if segs is not None else (None, None)
    out, lse = _attention(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out
