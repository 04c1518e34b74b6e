"""Fused Pallas kernels for landmark attention's grouped softmax (portable ``pallas_call``: Triton on GPU,
``interpret=True`` on CPU).

Semantics are those of :func:`lca.attention.landmark.landmark_reference_attention`, the plain reference these
kernels are tested against. Key tiles are exactly ``block_size`` keys, so the key tile *is* the landmark
block, as in the reference Triton kernel. Per tile, the block's ordinary keys a query sees get their own
softmax and average value; group 0's online softmax then takes either the own-block keys or the block's
landmark as a pseudo-key carrying that average.

* forward, grid ``(b, h, query tiles)``: loop over key tiles -> ``out`` and group 0's ``lse0``;
* dQ, grid ``(b, h, query tiles)``: the same loop, recomputing each tile from ``lse0``;
* dK/dV, grid ``(b, kv heads, key tiles)``: loops over the query heads sharing the KV head and the query tiles.
Key tiles wholly after a query tile are skipped (``lax.cond``). GQA reads each KV head through the index map.

On GPU, Triton needs power-of-two tiles: ``block_size`` (e.g. 64) and ``block_q`` must be powers of two
there, the reference kernel's constraint too. Not run on a GPU yet (this session had no device).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lca.attention import landmark as landmark_lib

_NT = (((1,), (1,)), ((), ()))  # q @ k.T
_TN = (((0,), (0,)), ((), ()))  # p.T @ do: contract the query axis
BLOCK_Q = 64  # queries per program when the caller leaves block_q unset


@dataclasses.dataclass(frozen=True)
class _Static:
    block_size: int
    block_q: int
    scale: float
    kv_len: int
    segmented: bool
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Tile:
    """Grouped-softmax terms of one query tile ``[bq, d]`` against one landmark block (key tile ``[L, d]``)."""

    s: jax.Array  # [bq, L] scaled logits
    own: jax.Array  # [bq, L] ordinary keys of the query's own block it sees
    landmark: jax.Array  # [bq, L] the block's landmark, when the query sees it and a key of its block
    landmark_x: jax.Array  # [bq, 1] its logit (-inf when absent)
    group_probs: jax.Array  # [bq, L] softmax of the block's ordinary keys the query sees (earlier block)
    average: jax.Array  # [bq, d] their average value


def _tile_terms(st: _Static, q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg) -> _Tile:
    """Positions/segments: queries as a column ``[bq, 1]``, keys as a row ``[1, L]``."""
    L = st.block_size
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    visible = kv_valid & (kv_pos <= q_pos)
    if q_seg is not None:
        visible = visible & (q_seg == kv_seg)
    q_block, kv_block = q_pos // L, kv_pos // L
    is_landmark = kv_pos % L == L - 1
    own = visible & ~is_landmark & (kv_block == q_block)
    earlier = visible & ~is_landmark & (kv_block < q_block)
    group_x = jnp.where(earlier, s, -jnp.inf)
    group_max = jnp.max(group_x, axis=1, keepdims=True)
    seen = group_max > -jnp.inf
    group_p = jnp.exp(group_x - jnp.where(seen, group_max, 0.0))
    group_probs = group_p / jnp.where(seen, jnp.sum(group_p, axis=1, keepdims=True), 1.0)
    average = jnp.dot(group_probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    landmark = visible & is_landmark & (kv_block < q_block) & seen
    landmark_x = jnp.max(jnp.where(landmark, s, -jnp.inf), axis=1, keepdims=True)
    return _Tile(s, own, landmark, landmark_x, group_probs, average)


def _tile_step(st: _Static, carry, q, k, v, *positions_and_segments):
    """Fold one landmark block into group 0's running ``(m [bq, 1], l [bq, 1], acc [bq, d])``."""
    m, l, acc = carry
    t = _tile_terms(st, q, k, v, *positions_and_segments)
    own_x = jnp.where(t.own, t.s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.maximum(jnp.max(own_x, axis=1, keepdims=True), t.landmark_x))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p_own = jnp.exp(own_x - m_safe)
    p_landmark = jnp.exp(t.landmark_x - m_safe)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p_own, axis=1, keepdims=True) + p_landmark
    acc = alpha * acc + jnp.dot(p_own.astype(v.dtype), v, preferred_element_type=jnp.float32) + p_landmark * t.average
    return m_new, l, acc


def _tile_grads(st: _Static, q, k, v, do, lse, delta, *positions_and_segments):
    """``(dlogits [bq, L], weights [bq, L])`` of one tile from the final ``lse0`` and ``delta = rowsum(do * out)``
    (both ``[bq, 1]``, ``lse`` 0 on rows that see nothing); ``dq = dlogits @ k``, ``dk = dlogits.T @ q``,
    ``dv = weights.T @ do``. The landmark is a pseudo-key whose value is the block average (module docstring
    of ``lca.attention.landmark``).
    """
    t = _tile_terms(st, q, k, v, *positions_and_segments)
    p_own = jnp.where(t.own, jnp.exp(t.s - lse), 0.0)
    has_landmark = t.landmark_x > -jnp.inf
    p_landmark = jnp.where(has_landmark, jnp.exp(jnp.where(has_landmark, t.landmark_x, 0.0) - lse), 0.0)
    do_v = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)  # [bq, L]
    do_avg = jnp.sum(do.astype(jnp.float32) * t.average, axis=1, keepdims=True)  # [bq, 1]
    in_groups = p_landmark * t.group_probs
    dx = (
        p_own * (do_v - delta)
        + jnp.where(t.landmark, p_landmark * (do_avg - delta), 0.0)
        + in_groups * (do_v - do_avg)
    )
    return dx * st.scale, p_own + in_groups


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
            valid = _valid(st, start)
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


def _valid(st: _Static, start):
    """``[1, L]`` bool: which keys of the tile starting at ``start`` are real (not padding)."""
    return (start + lax.broadcasted_iota(jnp.int32, (1, st.block_size), 1)) < st.kv_len


def _padded_lengths(st: _Static, q_len: int, kv_len: int):
    return -(-q_len // st.block_q) * st.block_q, -(-kv_len // st.block_size) * st.block_size


def _pad(x, axis: int, size: int, mode: str = "constant"):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _padded_forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    q_len, kv_len = q.shape[1], k.shape[1]
    tq, tk = _padded_lengths(st, q_len, kv_len)
    qp, kp, vp = _pad(q, 1, tq), _pad(k, 1, tk), _pad(v, 1, tk)
    # Padded queries repeat the last position (sliced off below); padded keys are masked by kv_len.
    q_pos_p, kv_pos_p = _pad(q_pos, 0, tq, "edge"), _pad(kv_pos, 0, tk, "edge")
    q_seg_p = None if q_seg is None else _pad(q_seg, 1, tq)
    kv_seg_p = None if kv_seg is None else _pad(kv_seg, 1, tk)
    out, lse = _forward_kernel(st, qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p)
    return out[:, :q_len], lse[..., :q_len]


def _dq_kernel(st: _Static, q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg):
    """``dq [b, Tq, h, d]`` f32: grid ``(b, h, query tiles)``, a loop over the key tiles (landmark blocks)."""
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, L = st.block_q, st.block_size
    nq, nk = tq // bq, tk // L

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if st.segmented else (None, None)
        dq_ref = rest[-1]
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_col, delta_col = lse_ref[...][:, None], delta_ref[...][:, None]
        q_col = qpos_ref[...][:, None]
        qs_col = qseg_ref[...][:, None] if st.segmented else None
        q_max = jnp.max(q_col)

        def body(j, dq):
            start = pl.multiple_of(j * L, L)
            sl = pl.ds(start, L)
            kv_row = kvpos_ref[sl][None, :]

            def add(dq):
                k_tile = k_ref[sl, :]
                dx, _ = _tile_grads(st, q_tile, k_tile, v_ref[sl, :], do_tile, lse_col, delta_col, q_col, kv_row,
                                    _valid(st, start), qs_col, kvseg_ref[sl][None, :] if st.segmented else None)
                return dq + jnp.dot(dx.astype(k_tile.dtype), k_tile, preferred_element_type=jnp.float32)

            return lax.cond(jnp.min(kv_row) <= q_max, add, lambda c: c, dq)

        dq_ref[...] = lax.fori_loop(0, nk, body, jnp.zeros((bq, d), jnp.float32))

    spec = pl.BlockSpec
    row = lambda bi, hi, i: (bi, i, hi, 0)  # noqa: E731
    kv = lambda bi, hi, i: (bi, 0, hi // group, 0)  # noqa: E731
    in_specs = [
        spec((None, bq, None, d), row), spec((None, tk, None, d), kv), spec((None, tk, None, d), kv),
        spec((None, bq, None, d), row),
        spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)), spec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        spec((bq,), lambda bi, hi, i: (i,)), spec((tk,), lambda bi, hi, i: (0,)),
    ]
    args = [q, k, v, do, lse, delta, q_pos, kv_pos]
    if st.segmented:
        in_specs += [spec((None, bq), lambda bi, hi, i: (bi, i)), spec((None, tk), lambda bi, hi, i: (bi, 0))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel, grid=(b, h, nq), in_specs=in_specs, out_specs=spec((None, bq, None, d), row),
        out_shape=jax.ShapeDtypeStruct((b, tq, h, d), jnp.float32), interpret=st.interpret,
        name="lca_landmark_dq_portable",
    )(*args)


def _dkdv_kernel(st: _Static, q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg):
    """``(dk, dv [b, Tk, h_kv, d])`` f32: grid ``(b, kv heads, key tiles)``; loops over the query heads sharing
    the KV head and over the query tiles, so GQA sums in registers."""
    b, tq, h, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, L = st.block_q, st.block_size
    nq, nk = tq // bq, tk // L

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, *rest):
        qseg_ref, kvseg_ref = rest[:2] if st.segmented else (None, None)
        dk_ref, dv_ref = rest[-2:]
        j = pl.program_id(2)
        k_tile, v_tile = k_ref[...], v_ref[...]
        kv_row = kvpos_ref[...][None, :]
        ks_row = kvseg_ref[...][None, :] if st.segmented else None
        valid = _valid(st, j * L)
        kv_min = jnp.min(kv_row)

        def one_head(gi, carry):
            def body(i, carry):
                sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
                q_col = qpos_ref[sl][:, None]

                def add(carry):
                    dk, dv = carry
                    q_tile, do_tile = q_ref[sl, gi, :], do_ref[sl, gi, :]
                    dx, weights = _tile_grads(st, q_tile, k_tile, v_tile, do_tile, lse_ref[gi, sl][:, None],
                                              delta_ref[gi, sl][:, None], q_col, kv_row, valid,
                                              qseg_ref[sl][:, None] if st.segmented else None, ks_row)
                    dk = dk + lax.dot_general(dx.astype(q_tile.dtype), q_tile, _TN, preferred_element_type=jnp.float32)
                    dv = dv + lax.dot_general(weights.astype(do_tile.dtype), do_tile, _TN,
                                              preferred_element_type=jnp.float32)
                    return dk, dv

                return lax.cond(jnp.max(q_col) >= kv_min, add, lambda c: c, carry)

            return lax.fori_loop(0, nq, body, carry)

        zeros = jnp.zeros((L, d), jnp.float32)
        dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
        dk_ref[...] = dk
        dv_ref[...] = dv

    spec = pl.BlockSpec
    key = lambda bi, hk, j: (bi, j, hk, 0)  # noqa: E731
    grp = lambda bi, hk, j: (bi, 0, hk, 0)  # noqa: E731
    in_specs = [
        spec((None, tq, group, d), grp), spec((None, L, None, d), key), spec((None, L, None, d), key),
        spec((None, tq, group, d), grp),
        spec((None, group, tq), lambda bi, hk, j: (bi, hk, 0)), spec((None, group, tq), lambda bi, hk, j: (bi, hk, 0)),
        spec((tq,), lambda bi, hk, j: (0,)), spec((L,), lambda bi, hk, j: (j,)),
    ]
    args = [q, k, v, do, lse, delta, q_pos, kv_pos]
    if st.segmented:
        in_specs += [spec((None, tq), lambda bi, hk, j: (bi, 0)), spec((None, L), lambda bi, hk, j: (bi, j))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel, grid=(b, h_kv, nk), in_specs=in_specs,
        out_specs=[spec((None, L, None, d), key), spec((None, L, None, d), key)],
        out_shape=[jax.ShapeDtypeStruct((b, tk, h_kv, d), jnp.float32)] * 2, interpret=st.interpret,
        name="lca_landmark_dkdv_portable",
    )(*args)


def _padded_backward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None):
    """``(dq, dk, dv)`` f32 from the final ``out`` and ``lse0 [b, h, q_len]`` (and its cotangent ``dlse``, which
    enters where ``delta`` does: see :func:`lca.attention.landmark._backward`)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    tq, tk = _padded_lengths(st, q_len, kv_len)
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    qp, dop, kp, vp = _pad(q, 1, tq), _pad(dout.astype(q.dtype), 1, tq), _pad(k, 1, tk), _pad(v, 1, tk)
    lse_p, delta_p = _pad(lse, 2, tq), _pad(delta, 2, tq)
    q_pos_p, kv_pos_p = _pad(q_pos, 0, tq, "edge"), _pad(kv_pos, 0, tk, "edge")
    q_seg_p = None if q_seg is None else _pad(q_seg, 1, tq)
    kv_seg_p = None if kv_seg is None else _pad(kv_seg, 1, tk)
    tiles = (qp, kp, vp, dop, lse_p, delta_p, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p)
    # Padded query rows have do = 0 and delta = 0, so they add nothing to dk, dv.
    dq = _dq_kernel(st, *tiles)[:, :q_len]
    dk, dv = _dkdv_kernel(st, *tiles)
    return dq, dk[:, :kv_len], dv[:, :kv_len]


_landmark_pallas = landmark_lib.landmark_vjp(_padded_forward, _padded_backward)


def landmark_flash_attention(q, k, v, *, block_size: int, causal: bool = True, segment_ids=None,
                             scale: float | None = None, q_positions=None, kv_positions=None,
                             block_q: int | None = None, interpret: bool | None = None):
    """Landmark attention with a fused Pallas forward; arguments as :func:`lca.attention.landmark_attention`.

    ``block_q``: queries per program (padded; a power of two on GPU; None: ``BLOCK_Q`` = 64); each program
    steps over the keys one landmark block at a time. ``interpret``: default True off GPU.
    Returns ``out [batch, q_len, num_heads, head_dim]`` in q's dtype.
    """
    r = landmark_lib.resolve_inputs(q, k, v, block_size=block_size, causal=causal, segment_ids=segment_ids,
                                    scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    st = _static(r.block_size, block_q, r.scale, q.shape[1], k.shape[1], r.q_segment_ids is not None, interpret)
    return _landmark_pallas(st, q, k, v, r.q_positions, r.kv_positions, r.q_segment_ids, r.kv_segment_ids)


def _static(block_size: int, block_q, scale: float, q_len: int, kv_len: int, segmented: bool, interpret=None):
    block_q = BLOCK_Q if block_q is None else block_q
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        raise ValueError(f"block_q must be a positive int or None (the default, {BLOCK_Q}), got {block_q!r}.")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _Static(block_size=block_size, block_q=min(block_q, -(-q_len // 8) * 8), scale=scale, kv_len=kv_len,
                   segmented=segmented, interpret=bool(interpret))


def step_forward(block_size: int, block_q, scale: float, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """The kernels as a sharded attention's step forward on resolved inputs: ``(out f32, lse0 [b, h, q_len])``
    (:func:`lca.attention.landmark_step` with ``kernel="pallas"``; ``block_q``: queries per program)."""
    st = _static(block_size, block_q, scale, q.shape[1], k.shape[1], q_seg is not None)
    return _padded_forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def step_backward(block_size: int, block_q, scale: float, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                  dlse):
    """The step backward: ``(dq, dk, dv)`` f32 from the global ``out``, ``lse0`` and their cotangents."""
    st = _static(block_size, block_q, scale, q.shape[1], k.shape[1], q_seg is not None)
    return _padded_backward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)


__all__ = ["landmark_flash_attention", "step_backward", "step_forward"]
