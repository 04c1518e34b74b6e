"""A fused Pallas forward for landmark attention's grouped softmax (portable ``pallas_call``: Triton on GPU,
``interpret=True`` on CPU).

Semantics are those of :func:`lca.attention.landmark.landmark_reference_attention`, the plain reference this
kernel is tested against. Grid ``(batch, heads, query tiles)``; each program loops over key tiles of exactly
``block_size`` keys, so the key tile *is* the landmark block, as in the reference Triton kernel. Per tile it
computes the block's softmax average of the ordinary keys the query sees, and folds into group 0's online
softmax either the own-block keys or the block's landmark as a pseudo-key carrying that average.

The backward is the recompute-from-``(out, lse0)`` blockwise backward of :mod:`lca.attention.landmark`
(plain JAX, O(n) memory), tied to the kernel with ``jax.custom_vjp``; a backward kernel is not written yet.

On GPU, Triton needs power-of-two tiles: ``block_size`` (e.g. 64) and ``block_q`` must be powers of two
there; the reference kernel has the same constraint. GQA reads each KV head through the index map (no copies).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lca.attention import landmark as landmark_lib

_NT = (((1,), (1,)), ((), ()))  # q @ k.T


@dataclasses.dataclass(frozen=True)
class _Static:
    block_size: int
    block_q: int
    scale: float
    kv_len: int
    segmented: bool
    interpret: bool


def _tile_step(st: _Static, carry, q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg):
    """Fold one landmark block (key tile ``[L, d]``) into group 0's ``(m, l, acc)`` for a query tile ``[bq, d]``.

    Positions/segments: queries as a column ``[bq, 1]``, keys as a row ``[1, L]``.
    """
    m, l, acc = carry
    L = st.block_size
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale  # [bq, L]
    visible = kv_valid & (kv_pos <= q_pos)
    if q_seg is not None:
        visible = visible & (q_seg == kv_seg)
    q_block, kv_block = q_pos // L, kv_pos // L
    is_landmark = kv_pos % L == L - 1
    own = visible & ~is_landmark & (kv_block == q_block)
    earlier = visible & ~is_landmark & (kv_block < q_block)
    landmark = visible & is_landmark & (kv_block < q_block)

    # The block's own softmax over the ordinary keys this query sees, and its average value.
    group_x = jnp.where(earlier, s, -jnp.inf)
    group_max = jnp.max(group_x, axis=1, keepdims=True)
    seen = group_max > -jnp.inf
    group_p = jnp.exp(group_x - jnp.where(seen, group_max, 0.0))
    group_sum = jnp.sum(group_p, axis=1, keepdims=True)
    average = jnp.dot(group_p.astype(v.dtype), v, preferred_element_type=jnp.float32) / jnp.where(seen, group_sum, 1.0)

    # Group 0: own-block keys, plus the landmark of a block with a seen key.
    own_x = jnp.where(own, s, -jnp.inf)
    landmark_x = jnp.max(jnp.where(landmark & seen, s, -jnp.inf), axis=1, keepdims=True)
    m_new = jnp.maximum(m, jnp.maximum(jnp.max(own_x, axis=1, keepdims=True), landmark_x))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p_own = jnp.exp(own_x - m_safe)
    p_landmark = jnp.exp(landmark_x - m_safe)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p_own, axis=1, keepdims=True) + p_landmark
    acc = alpha * acc + jnp.dot(p_own.astype(v.dtype), v, preferred_element_type=jnp.float32) + p_landmark * average
    return m_new, l, acc


def _forward_kernel(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """``(out [b, Tq, h, d] f32, lse0 [b, h, Tq] f32)`` on inputs padded to the tiles."""
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, L = st.block_q, st.block_size
    nq, nk = tq // bq, tk // L

    def kernel(q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if st.segmented else (None, None)
        o_ref, lse_ref = rest[-2:]
        q_tile = q_ref[...]
        q_col = qpos_ref[...][:, None]
        qs_col = qseg_ref[...][:, None] if st.segmented else None
        q_max = jnp.max(q_col)

        def body(j, carry):
            start = pl.multiple_of(j * L, L)
            sl = pl.ds(start, L)
            valid = (start + lax.broadcasted_iota(jnp.int32, (1, L), 1)) < st.kv_len
            kv_seg_row = kvseg_ref[sl][None, :] if st.segmented else None
            kv_row = kvpos_ref[sl][None, :]

            def fold(carry):
                return _tile_step(st, carry, q_tile, k_ref[sl, :], v_ref[sl, :], q_col, kv_row, valid, qs_col,
                                  kv_seg_row)

            # A key tile wholly after the query tile is causally hidden: skip its loads and math.
            return lax.cond(jnp.min(kv_row) <= q_max, fold, lambda c: c, carry)

        init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                jnp.zeros((bq, d), jnp.float32))
        m, l, acc = lax.fori_loop(0, nk, body, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)[:, 0]

    spec = pl.BlockSpec
    in_specs = [
        spec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
        spec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // group, 0)),
        spec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // group, 0)),
        spec((bq,), lambda bi, hi, i: (i,)),
        spec((tk,), lambda bi, hi, i: (0,)),
    ]
    args = [q, k, v, q_pos, kv_pos]
    if st.segmented:
        in_specs += [spec((None, bq), lambda bi, hi, i: (bi, i)), spec((None, tk), lambda bi, hi, i: (bi, 0))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=[
            spec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        interpret=st.interpret,
        name="lca_landmark_fwd_portable",
    )(*args)


def _pad(x, axis: int, size: int, mode: str = "constant"):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _padded_forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    q_len, kv_len = q.shape[1], k.shape[1]
    tq = -(-q_len // st.block_q) * st.block_q
    tk = -(-kv_len // st.block_size) * st.block_size
    qp, kp, vp = _pad(q, 1, tq), _pad(k, 1, tk), _pad(v, 1, tk)
    # Padded queries repeat the last position (sliced off below); padded keys are masked by kv_len.
    q_pos_p, kv_pos_p = _pad(q_pos, 0, tq, "edge"), _pad(kv_pos, 0, tk, "edge")
    q_seg_p = None if q_seg is None else _pad(q_seg, 1, tq)
    kv_seg_p = None if kv_seg is None else _pad(kv_seg, 1, tk)
    out, lse = _forward_kernel(st, qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p)
    return out[:, :q_len], lse[..., :q_len]


_landmark_pallas = landmark_lib.landmark_vjp(_padded_forward)


def landmark_flash_attention(q, k, v, *, block_size: int, causal: bool = True, segment_ids=None,
                             scale: float | None = None, q_positions=None, kv_positions=None, block_q: int = 64,
                             interpret: bool | None = None):
    """Landmark attention with a fused Pallas forward; arguments as :func:`lca.attention.landmark_attention`.

    ``block_q``: queries per program (padded; a power of two on GPU). ``interpret``: default True off GPU.
    Returns ``out [batch, q_len, num_heads, head_dim]`` in q's dtype.
    """
    r = landmark_lib.resolve_inputs(q, k, v, block_size=block_size, causal=causal, segment_ids=segment_ids,
                                    scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}.")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    q_len, kv_len = q.shape[1], k.shape[1]
    st = _Static(block_size=r.block_size, block_q=min(block_q, -(-q_len // 8) * 8), scale=r.scale, kv_len=kv_len,
                 segmented=r.q_segment_ids is not None, interpret=bool(interpret))
    return _landmark_pallas(st, q, k, v, r.q_positions, r.kv_positions, r.q_segment_ids, r.kv_segment_ids)


__all__ = ["landmark_flash_attention"]
