"""Landmark attention (Mohtashami & Jaggi, 2023): a grouped softmax that lets a landmark stand for its block.

A landmark token ends every block of ``block_size = L`` tokens (``L - 1`` ordinary tokens, then the
landmark). Which key is a landmark, and which block it belongs to, is read from its *position*:

    block(s) = s // L            landmark(s) = (s % L == L - 1)

in lca's key coordinate frame (``kv_positions``, default ``arange(kv_len)``). The landmark block is thus
aligned with position multiples of ``L``, as in the reference Triton kernel, where the attention block is
the landmark block. The data transforms in :mod:`lca.data.landmark` put landmarks exactly there.

Grouped softmax, for a query at position ``p`` in block ``B = p // L`` (all keys also pass the causal
mask ``s <= p`` and the segment mask):

* **group 0**: the ordinary keys of block ``B`` plus the landmarks of the earlier blocks ``j < B``, in one
  softmax ``P0``. The query's own block's landmark is never in it, not even for the landmark query itself
  (reference: "the landmark token for the current block should be ignored, even if we are processing the
  landmark token itself"; the Triton kernel shifts the landmark query one position back).
* **group j** (``j < B``): the ordinary keys of block ``j``, in their own softmax ``Pj``, each multiplied by
  ``P0(landmark j)``.
* landmarks carry no value weight; every row sums to 1 (0 for a query that sees nothing).

Equivalently, landmark ``j`` is a pseudo-key of group 0 whose value is ``uj = sum_s Pj(s) v_s``, the
softmax average of its block. The blockwise version and the retrieval path use that form.

Retrieval at inference (:func:`landmark_retrieval_attention`): complete blocks leave the local window and
go into a :class:`BlockCache` (keys before rotary embedding, values; the landmark key is slot ``L - 1``).
Each query scores the ``n`` cached landmark keys, takes the top ``k`` blocks, and attends over them plus
its local window with the same grouped softmax (retrieved blocks are earlier blocks). A capped cache is a
preallocated buffer of ``capacity`` blocks with a count ``n`` of those in use (traced), and the local window
may be a fixed-size buffer with a traced fill (``window_len``): unused slots never score nor take part, so
one compiled decoding step serves every context length.

Positions of retrieved blocks, the paper's "stingy" scheme as in the reference (llama/llama_mem.py), with
``k' = min(top_k, n)`` and the cache in age order (oldest first):

* scoring: the landmark key of cached block ``i`` sits at position ``slot(i) * L + L - 1`` with
  ``slot(i) = i - (n - k') + 1`` for the ``k'`` most recent blocks and ``0`` for all older ones;
* attending: the retrieved blocks, sorted by age, take consecutive slots ``r = 0 .. k'-1``, moved one slot
  up when the block is one of the ``k'`` most recent; a block in slot ``t`` holds positions ``t*L ..
  t*L + L - 1``;
* the local window (the keys after the last cached block) starts at ``(k' + 1) * L``.

Public functions: :func:`landmark_reference_attention` (dense oracle) and :func:`landmark_weights` (its
weight matrix); :func:`landmark_attention` (blockwise, O(n) memory, custom VJP) built from
:func:`landmark_forward` / :func:`landmark_backward` through :func:`landmark_vjp`, which the Pallas kernels in
``kernels_pallas.landmark`` reuse; :func:`landmark_step`, the same pair (or the kernels') as a sharded
attention's local step; :func:`landmark_retrieval_attention` with :class:`BlockCache`,
:func:`empty_block_cache` and :func:`append_blocks` for inference; :func:`landmark_decoded_attention`, a
whole row attended block by block through the retrieval path (what decoding meets), for training.

Deviations from the reference, and why:

* The reference places memory at ``full_len - (k'+1) L`` so the local window keeps its true positions;
  here the local window starts at ``(k' + 1) L``. Rotary embeddings only see differences, so this is the
  same attention; with ``top_k >= n`` every block lands exactly ``L`` after its true position.
* A landmark whose block has no ordinary key the query can see (a packed document that starts on the
  landmark) is dropped from group 0. The reference divides by an empty group's zero (NaN in the llama
  code; lost probability mass in lm_benchmark). Rows here always sum to 1.
* The retrieval default is ``selection="per_head"`` (per query and per head), the reference code's default
  (``cache_selection_method="per_token_and_head"``). ``"shared"`` is the paper's variant that retrieves one
  set of blocks for all heads: softmax of the landmark scores per head, max over heads, then top-k. With
  GQA, "head" means query head; each reads its kv head's cached block.
* ``top_k`` larger than a capped cache's capacity is an error; a cache still holding fewer than ``top_k``
  blocks retrieves all of them (the reference's ``min(top_k, n)``).
* Only causal attention: the grouped softmax is defined over earlier blocks. No window or softcap.
  Group 0 is a softmax over *pseudo-keys* (the own block's ordinary keys, and each earlier landmark
  standing for its block's softmax average), so its log-sum-exp ``lse0`` merges a key shard's partial
  result into the others' like any attention's lse, as long as every block lies whole in one shard:
  :func:`landmark_step` is landmark attention as the local step of ring, Ulysses and USP attention.
* Rotary embeddings are applied inside the retrieval path (through the ``rope`` callable) because retrieved
  keys are re-positioned per query; training-time functions take already-rotated ``q`` and ``k`` like
  every other lca attention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from lca.attention import inputs
from lca.attention.blocks import BlockSizes
from lca.attention.impl import LocalImpl
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask, segment_visible
from lca.attention.static import positive_int
from lca.attention.vjp import attention_vjp

SELECTIONS = ("per_head", "shared")


# ------------------------------------------------------------------------------------------------ validation


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
        raise ValueError(
            f"block_size must be an int >= 2 (L - 1 ordinary tokens, then the landmark), got {block_size!r}; "
            f"the paper uses 50 or 64."
        )
    return int(block_size)


def _check_causal(causal):
    if causal is not True:
        raise ValueError(
            f"causal must be True: landmark attention's grouped softmax is defined over earlier blocks, "
            f"got causal={causal!r}."
        )


def _check_kv_block(kv_block, block_size: int, name: str = "kv_block") -> int:
    """Keys per chunk (None: one landmark block); ``name`` is the caller's argument (a step's ``block_kv``)."""
    if kv_block is None:
        return block_size
    kv_block = positive_int(name, kv_block)
    if kv_block % block_size:
        raise ValueError(
            f"{name}={kv_block} must be a multiple of block_size={block_size}: each attention block holds "
            f"whole landmark blocks; use e.g. {name}={block_size * max(1, kv_block // block_size)}."
        )
    return kv_block


def _check_selection(top_k, selection, *, least: int) -> None:
    """The retrieval options: ``top_k`` an int >= ``least``, ``selection`` one of SELECTIONS."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not known; use one of {list(SELECTIONS)}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < least:
        raise ValueError(f"top_k must be an int >= {least} (blocks retrieved per query), got {top_k!r}.")


def _check_aligned_positions(kv_pos, block_size: int):
    """Each array chunk of ``block_size`` keys must hold one landmark block (checked when positions are concrete)."""
    try:
        pos = np.asarray(kv_pos)
    except jax.errors.TracerArrayConversionError:
        return
    first = np.repeat(pos[::block_size], block_size)[: len(pos)]
    if np.any(pos // block_size != first // block_size):
        raise ValueError(
            f"kv_positions must put each aligned chunk of block_size={block_size} keys in one landmark block "
            f"(positions j*L .. j*L + L - 1 in order, a chunk may be cut short), got {pos.tolist()[:3 * block_size]}"
            f"...; use the default positions or the dense landmark_reference_attention."
        )


def _roles(positions, block_size: int):
    """``(block id, is landmark)`` of each position."""
    return positions // block_size, positions % block_size == block_size - 1


# ------------------------------------------------------------------------------------------------ dense oracle


def landmark_weights(
    q,
    k,
    *,
    block_size: int,
    causal: bool = True,
    segment_ids=None,
    scale: float | None = None,
    q_positions=None,
    kv_positions=None,
):
    """The dense attention weights of the grouped softmax: ``[batch, num_heads, q_len, kv_len]`` float32.

    Same arguments as :func:`landmark_reference_attention` (no values). Landmark columns are 0 and every
    row with a visible key sums to 1.
    """
    _check_causal(causal)
    block_size = _check_block_size(block_size)
    if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
        raise ValueError(f"q and k must be 4-D [batch, len, heads, head_dim], got {getattr(q, 'shape', q)} and "
                         f"{getattr(k, 'shape', k)}.")
    b, q_len, kv_len, _, h_kv, d = inputs.check_qkv(q, k, k)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    logit = inputs.logit_options(d, scale)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)

    qg = rearrange(q, "b q (hk g) d -> b hk g q d", hk=h_kv).astype(jnp.float32)
    logits = logit.apply(jnp.einsum("bhgqd,bkhd->bhgqk", qg, k.astype(jnp.float32)))

    visible = (kv_pos[None, :] <= q_pos[:, None])[None]  # [1, q, kv]
    if segs is not None:
        visible = visible & segment_visible(*segs)
    q_block, _ = _roles(q_pos, block_size)
    kv_block, kv_is_landmark = _roles(kv_pos, block_size)
    own = visible & ~kv_is_landmark & (kv_block[None, :] == q_block[:, None])
    earlier = visible & ~kv_is_landmark & (kv_block[None, :] < q_block[:, None])
    same_block = kv_block[:, None] == kv_block[None, :]  # [kv, kv]
    # A landmark stands for the ordinary keys of its block this query sees; with none, it is dropped.
    group_seen = jnp.einsum("bqs,st->bqt", earlier.astype(jnp.float32), same_block.astype(jnp.float32)) > 0
    landmark = visible & kv_is_landmark & (kv_block[None, :] < q_block[:, None]) & group_seen
    own, earlier, landmark = (x[:, None, None] for x in (own, earlier, landmark))

    p0 = _masked_softmax(logits, own | landmark, axis=-1)
    # Group j's softmax, for each earlier key: its max and sum over the keys of its own block.
    in_group = earlier[..., None, :] & same_block  # [b, 1, 1, q, key s, key t in block(s)]
    group_logits = jnp.where(in_group, logits[..., None, :], -jnp.inf)
    group_max = _finite(jnp.max(group_logits, axis=-1))
    group_sum = jnp.sum(jnp.exp(group_logits - group_max[..., None]), axis=-1)
    p_group = jnp.where(earlier, jnp.exp(logits - group_max) / jnp.where(earlier, group_sum, 1.0), 0.0)
    # P0 of the landmark of each key's block.
    p_landmark = jnp.einsum("bhgqt,st->bhgqs", jnp.where(landmark, p0, 0.0), same_block.astype(jnp.float32))
    weights = jnp.where(own, p0, 0.0) + p_group * p_landmark
    return rearrange(weights, "b hk g q k -> b (hk g) q k")


def _finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _masked_softmax(logits, keep, axis):
    masked = jnp.where(keep, logits, -jnp.inf)
    unnorm = jnp.exp(masked - _finite(jnp.max(masked, axis=axis, keepdims=True)))
    denom = jnp.sum(unnorm, axis=axis, keepdims=True)
    return unnorm / jnp.where(denom > 0, denom, 1.0)


def landmark_reference_attention(
    q,
    k,
    v,
    *,
    block_size: int,
    causal: bool = True,
    segment_ids=None,
    scale: float | None = None,
    q_positions=None,
    kv_positions=None,
):
    """Dense landmark attention (grouped softmax), the oracle every landmark variant is tested against.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]`` (rotary embeddings already applied).
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``, ``num_heads % num_kv_heads == 0``.
      block_size: ``L``; the key at position ``s`` is the landmark of block ``s // L`` iff
        ``s % L == L - 1`` (see the module docstring).
      causal: must be True.
      segment_ids: ``[batch, len]`` or ``(q_segment_ids, kv_segment_ids)``, as in ``reference_attention``.
      scale: logit scale, default ``1 / sqrt(head_dim)``.
      q_positions, kv_positions: int ``[q_len]`` / ``[kv_len]``; default bottom-right aligned.

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype; a query that sees no key gets 0.
    """
    inputs.check_qkv(q, k, v)
    weights = landmark_weights(
        q, k, block_size=block_size, causal=causal, segment_ids=segment_ids, scale=scale,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    h_kv = k.shape[2]
    weights = rearrange(weights, "b (hk g) q k -> b hk g q k", hk=h_kv)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
    return rearrange(out, "b q hk g d -> b q (hk g) d").astype(q.dtype)


# ------------------------------------------------------------------------------------------------ group 0 online


def _block_groups(x, ordinary, values):
    """Softmax of each block's ordinary keys: ``(has_group [..., n], average value uj [..., n, d], probs [..., n, L])``.

    ``x [b, hk, g, q, n, L]`` logits, ``ordinary`` the same shape (keys of an earlier block the query sees),
    ``values [b, n, L, hk, d]``.
    """
    masked = jnp.where(ordinary, x, -jnp.inf)
    unnorm = jnp.exp(masked - _finite(jnp.max(masked, axis=-1, keepdims=True)))
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    probs = unnorm / jnp.where(denom > 0, denom, 1.0)
    average = jnp.einsum("bhgqnl,bnlhd->bhgqnd", probs, values)
    return denom[..., 0] > 0, average, probs


@dataclasses.dataclass(frozen=True)
class _ChunkTerms:
    """Group-0 items of one key chunk for every query: its own-block keys and its landmark pseudo-keys."""

    x: jax.Array  # [b, hk, g, q, n, L] logits
    own: jax.Array  # [b, hk, g, q, n, L] bool: ordinary keys of the query's own block
    landmark: jax.Array  # [b, hk, g, q, n, L] bool: the visible landmark of an earlier, seen block
    landmark_x: jax.Array  # [b, hk, g, q, n] the landmark logit (-inf when absent)
    average: jax.Array  # [b, hk, g, q, n, d] the block's softmax average value
    group_probs: jax.Array  # [b, hk, g, q, n, L] within-block softmax of earlier ordinary keys


def _chunk_terms(qg, k_blk, v_blk, q_pos, kv_pos, kv_valid, q_seg, kv_seg, block_size, scale):
    """Grouped-softmax terms of one chunk of whole landmark blocks.

    ``qg [b, hk, g, q, d]`` f32; ``k_blk, v_blk [b, n, L, hk, d]`` f32; ``q_pos [q]``; ``kv_pos, kv_valid
    [n, L]``; ``q_seg [b, q]`` and ``kv_seg [b, n, L]`` or None.
    """
    x = jnp.einsum("bhgqd,bnlhd->bhgqnl", qg, k_blk) * scale
    visible = kv_valid[None, None] & (kv_pos[None, None] <= q_pos[None, :, None, None])  # [1, q, n, L]
    if q_seg is not None:
        visible = visible & (q_seg[:, :, None, None] == kv_seg[:, None])
    q_block, _ = _roles(q_pos, block_size)
    kv_block, kv_is_landmark = _roles(kv_pos, block_size)
    same = kv_block[None] == q_block[:, None, None]
    before = kv_block[None] < q_block[:, None, None]
    own = (visible & ~kv_is_landmark & same)[:, None, None]
    earlier = (visible & ~kv_is_landmark & before)[:, None, None]
    has_group, average, group_probs = _block_groups(x, earlier, v_blk)
    landmark = (visible & kv_is_landmark & before)[:, None, None] & has_group[..., None]
    landmark_x = jnp.max(jnp.where(landmark, x, -jnp.inf), axis=-1)
    return _ChunkTerms(x, own, landmark, landmark_x, average, group_probs)


def _empty_state(qg):
    """Group 0's running ``(max, sum, acc)`` before any key, for queries ``qg [b, hk, g, q, d]``."""
    # *_like: inside a shard_map the state varies over the mesh axes the queries vary over, as scan needs
    return (jnp.full_like(qg[..., 0], -jnp.inf, jnp.float32), jnp.zeros_like(qg[..., 0], jnp.float32),
            jnp.zeros_like(qg, jnp.float32))


def _online_update(carry, terms: _ChunkTerms, v_blk):
    """Fold one chunk's group-0 items into the running ``(max, sum, acc)`` of group 0."""
    row_max, row_sum, acc = carry
    own_x = jnp.where(terms.own, terms.x, -jnp.inf)
    chunk_max = jnp.maximum(jnp.max(own_x, axis=(-2, -1)), jnp.max(terms.landmark_x, axis=-1))
    new_max = jnp.maximum(row_max, chunk_max)
    safe = _finite(new_max)
    p_own = jnp.exp(own_x - safe[..., None, None])
    p_landmark = jnp.exp(terms.landmark_x - safe[..., None])
    rescale = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max - safe, -jnp.inf))
    row_sum = row_sum * rescale + p_own.sum(axis=(-2, -1)) + p_landmark.sum(axis=-1)
    acc = (
        acc * rescale[..., None]
        + jnp.einsum("bhgqnl,bnlhd->bhgqd", p_own, v_blk)
        + jnp.einsum("bhgqn,bhgqnd->bhgqd", p_landmark, terms.average)
    )
    return new_max, row_sum, acc


def _finish(row_max, row_sum, acc):
    """``(out [..., d], lse0 [...])`` of group 0; ``lse0 = -inf`` for a query that sees nothing."""
    seen = row_sum > 0
    out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
    lse = jnp.where(seen, _finite(row_max) + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
    return out, lse


# ------------------------------------------------------------------------------------------------ blockwise


Q_BLOCK = 512  # queries per tile of the blockwise version: bounds the working set, lets causal skip
_NO_KEY = int(np.iinfo(np.int32).min)  # the position of a padding query: causal, it sees no key


@dataclasses.dataclass(frozen=True)
class _Static:
    block_size: int
    kv_block: int
    scale: float
    q_block: int = Q_BLOCK


def _kv_chunks(st: _Static, k, v, kv_pos, kv_seg):
    """Pad the keys to whole chunks and split: scan inputs ``[c, b, n, L, hk, d]`` etc.

    Also returns each chunk's first visible position ``[c]`` (int32 max for a chunk of padding):
    a tile of queries whose last position is before it sees nothing of the chunk (causal).
    """
    kv_len = k.shape[1]
    n_chunks = -(-kv_len // st.kv_block)
    padded = n_chunks * st.kv_block
    extra = padded - kv_len
    n, L = st.kv_block // st.block_size, st.block_size

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    def chunks(x):
        return rearrange(pad(x, 1).astype(jnp.float32), "b (c n l) h d -> c b n l h d", n=n, l=L)

    pos = rearrange(pad(kv_pos, 0), "(c n l) -> c n l", n=n, l=L)
    valid = rearrange(jnp.arange(padded) < kv_len, "(c n l) -> c n l", n=n, l=L)
    seg = None if kv_seg is None else rearrange(pad(kv_seg, 1), "b (c n l) -> c b n l", n=n, l=L)
    first = jnp.min(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max), axis=(1, 2))
    return (chunks(k), chunks(v), pos, valid, seg), first


def _q_tiles(tile: int, q_len: int, *per_query):
    """Split query-indexed arrays into tiles ``[t, ...]`` of ``tile`` queries (``tile <= q_len``).

    Each argument is ``(array, axis)``, ``(array, axis, fill)`` or ``None``; padding is ``fill`` (default 0).
    """
    extra = -q_len % tile

    def split(item):
        if item is None:
            return None
        x, axis, fill = (*item, 0)[:3]
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        x = jnp.moveaxis(jnp.pad(x, widths, constant_values=fill), axis, 0)
        return jnp.moveaxis(rearrange(x, "(t q) ... -> t q ...", q=tile), 1, axis + 1)

    return tuple(split(item) for item in per_query)


def _untile(x, axis: int, q_len: int):
    """Inverse of :func:`_q_tiles` for one output: ``[t, ..., tile (at axis + 1), ...]`` -> ``[..., q_len, ...]``."""
    x = jnp.moveaxis(x, axis + 1, 1)
    x = rearrange(x, "t q ... -> (t q) ...")[:q_len]
    return jnp.moveaxis(x, 0, axis)


def _forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    h_kv, q_len = k.shape[2], q.shape[1]
    qg = rearrange(q, "b q (hk g) d -> b hk g q d", hk=h_kv).astype(jnp.float32)
    chunks, first = _kv_chunks(st, k, v, kv_pos, kv_seg)
    tiles = _q_tiles(min(st.q_block, q_len), q_len, (qg, 3), (q_pos, 0, _NO_KEY),
                     None if q_seg is None else (q_seg, 1))

    def tile_fn(tile):
        qg_t, pos_t, seg_t = tile
        last = jnp.max(pos_t)

        def step(carry, chunk):
            (k_blk, v_blk, pos, valid, seg), chunk_first = chunk

            def update(carry):
                terms = _chunk_terms(qg_t, k_blk, v_blk, pos_t, pos, valid, seg_t, seg, st.block_size, st.scale)
                return _online_update(carry, terms, v_blk)

            return jax.lax.cond(chunk_first <= last, update, lambda c: c, carry), None

        carry, _ = jax.lax.scan(step, _empty_state(qg_t), (chunks, first))
        return _finish(*carry)

    out, lse = jax.lax.map(tile_fn, tiles)  # [t, b, hk, g, tile, d], [t, b, hk, g, tile]
    out, lse = _untile(out, 3, q_len), _untile(lse, 3, q_len)
    return rearrange(out, "b hk g q d -> b q (hk g) d"), rearrange(lse, "b hk g q -> b (hk g) q")


def _chunk_grads(st: _Static, qg, do, delta, lse_safe, q_pos, q_seg, dq, chunk):
    """One key chunk's contribution to ``dq`` of a query tile, and its ``(dk, dv)`` from that tile."""
    k_blk, v_blk, pos, valid, seg = chunk
    t = _chunk_terms(qg, k_blk, v_blk, q_pos, pos, valid, q_seg, seg, st.block_size, st.scale)
    p_own = jnp.where(t.own, jnp.exp(t.x - lse_safe[..., None, None]), 0.0)
    has_landmark = jnp.isfinite(t.landmark_x)
    p_landmark = jnp.where(has_landmark, jnp.exp(jnp.where(has_landmark, t.landmark_x, 0.0) - lse_safe[..., None]), 0.0)
    do_v = jnp.einsum("bhgqd,bnlhd->bhgqnl", do, v_blk)
    do_avg = jnp.einsum("bhgqd,bhgqnd->bhgqn", do, t.average)
    in_groups = p_landmark[..., None] * t.group_probs  # final weights of earlier ordinary keys
    dx = (
        p_own * (do_v - delta[..., None, None])
        + jnp.where(t.landmark, (p_landmark * (do_avg - delta[..., None]))[..., None], 0.0)
        + in_groups * (do_v - do_avg[..., None])
    ) * st.scale
    dq = dq + jnp.einsum("bhgqnl,bnlhd->bhgqd", dx, k_blk)
    dk = jnp.einsum("bhgqnl,bhgqd->bnlhd", dx, qg)
    dv = jnp.einsum("bhgqnl,bhgqd->bnlhd", p_own + in_groups, do)
    return dq, (dk, dv)


def _backward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None):
    """Recompute each (query tile, key chunk)'s terms from ``lse0`` and return ``(dq, dk, dv)`` float32.

    ``dlse [b, h, q_len]``: a cotangent of ``lse0`` (None: zero). ``lse0`` depends on the group-0 logits
    only, with derivative their weight ``P0``, so it enters as ``delta - dlse`` exactly where ``delta`` does.
    """
    b, kv_len, h_kv, d = k.shape
    q_len = q.shape[1]
    qg = rearrange(q, "b q (hk g) d -> b hk g q d", hk=h_kv).astype(jnp.float32)
    do = rearrange(dout.astype(jnp.float32), "b q (hk g) d -> b hk g q d", hk=h_kv)
    o = rearrange(out.astype(jnp.float32), "b q (hk g) d -> b hk g q d", hk=h_kv)
    delta = jnp.sum(do * o, axis=-1)  # [b, hk, g, q]
    if dlse is not None:
        delta = delta - rearrange(dlse.astype(jnp.float32), "b (hk g) q -> b hk g q", hk=h_kv)
    lse_safe = _finite(rearrange(lse, "b (hk g) q -> b hk g q", hk=h_kv))
    chunks, first = _kv_chunks(st, k, v, kv_pos, kv_seg)
    tiles = _q_tiles(min(st.q_block, q_len), q_len, (qg, 3), (do, 3), (delta, 3), (lse_safe, 3), (q_pos, 0, _NO_KEY),
                     None if q_seg is None else (q_seg, 1))
    kv_zeros = jnp.zeros_like(chunks[0], jnp.float32)  # [c, b, n, L, hk, d], varying as the keys

    def tile_step(acc, tile):
        qg_t, do_t, delta_t, lse_t, pos_t, seg_t = tile
        last = jnp.max(pos_t)
        grads = functools.partial(_chunk_grads, st, qg_t, do_t, delta_t, lse_t, pos_t, seg_t)

        def step(dq, chunk):
            one, chunk_first = chunk
            zeros = (jnp.zeros_like(one[0]), jnp.zeros_like(one[1]))
            return jax.lax.cond(chunk_first <= last, lambda dq: grads(dq, one), lambda dq: (dq, zeros), dq)

        dq_t, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg_t), (chunks, first))
        return (acc[0] + dk, acc[1] + dv), dq_t

    (dk, dv), dq = jax.lax.scan(tile_step, (kv_zeros, kv_zeros), tiles)
    dq = _untile(dq, 3, q_len)
    dk = rearrange(dk, "c b n l h d -> b (c n l) h d")[:, :kv_len]
    dv = rearrange(dv, "c b n l h d -> b (c n l) h d")[:, :kv_len]
    return rearrange(dq, "b hk g q d -> b q (hk g) d"), dk, dv


def _static(block_size: int, kv_block, scale: float, q_block) -> _Static:
    q_block = Q_BLOCK if q_block is None else positive_int("q_block", q_block)
    return _Static(block_size, _check_kv_block(kv_block, block_size), float(scale), q_block)


def landmark_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, block_size: int,
                     scale: float, kv_block: int | None = None, q_block: int | None = None):
    """Blockwise forward on resolved inputs: ``(out [b, q_len, h, d] f32, lse0 [b, h, q_len] f32)``.

    ``lse0`` is group 0's log-sum-exp (``-inf`` for a query that sees nothing): with the output, all the
    backward needs. Positions are resolved int32 ``[len]``; segment ids ``[b, len]`` or None. Kernels reuse
    this pair (see ``kernels_pallas.landmark``).
    """
    st = _static(block_size, kv_block, scale, q_block)
    return _forward(st, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def landmark_backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, dout, *,
                      block_size: int, scale: float, kv_block: int | None = None, q_block: int | None = None):
    """``(dq, dk, dv)`` float32 from the final ``out`` and ``lse0 [b, h, q_len]`` (recomputes each key chunk)."""
    st = _static(block_size, kv_block, scale, q_block)
    return _backward(st, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, dout)


def landmark_vjp(forward, backward):
    """``f(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> out`` in q's dtype, differentiable.

    ``forward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out f32, lse0 [b, h, q_len])`` and
    ``backward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse0, dout) -> (dq, dk, dv)`` on resolved
    inputs, as :func:`landmark_forward` / :func:`landmark_backward`; kernels bring their own pair.
    """

    def with_dlse(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse):
        del dlse  # lse0 is never returned to the caller, so its cotangent is zero
        return backward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout)

    with_lse = attention_vjp(forward, with_dlse)

    def attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return with_lse(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]

    return attention


_landmark = landmark_vjp(_forward, _backward)


def landmark_attention(
    q,
    k,
    v,
    *,
    block_size: int,
    causal: bool = True,
    segment_ids=None,
    scale: float | None = None,
    q_positions=None,
    kv_positions=None,
    kv_block: int | None = None,
    q_block: int | None = None,
):
    """O(n)-memory landmark attention with the exact semantics of :func:`landmark_reference_attention`.

    Queries go in tiles of ``q_block``; for each tile a ``lax.scan`` over key chunks of ``kv_block`` keys
    (a multiple of ``block_size``, default ``block_size``: the attention block is the landmark block, as in
    the reference kernel) keeps group 0's online softmax, and each chunk's blocks are summarised as
    landmark pseudo-keys. A chunk that starts after the tile's last query is skipped (causal: about half
    the pairs). Only ``[q_block, kv_block]`` logits exist at a time. The custom backward recomputes them
    from the output and group 0's log-sum-exp (residuals O(q_len + kv_len)).

    Args:
      q, k, v, block_size, causal, segment_ids, scale, q_positions: as in
        :func:`landmark_reference_attention`.
      kv_positions: as there, but every aligned chunk of ``block_size`` keys must lie in one landmark block
        (checked when the positions are concrete); the default positions always do.
      kv_block: keys per scan step, a multiple of ``block_size``.
      q_block: queries per tile (default ``Q_BLOCK`` = 512, or ``q_len`` if shorter).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype.
    """
    kv_block = _check_kv_block(kv_block, _check_block_size(block_size))
    r = resolve_inputs(q, k, v, block_size=block_size, causal=causal, segment_ids=segment_ids, scale=scale,
                       q_positions=q_positions, kv_positions=kv_positions)
    kv_len = k.shape[1]
    st = _static(r.block_size, min(kv_block, -(-kv_len // r.block_size) * r.block_size), r.scale, q_block)
    return _landmark(st, q, k, v, r.q_positions, r.kv_positions, r.q_segment_ids, r.kv_segment_ids)


# ------------------------------------------------------------------------------------------------ sharded step


KERNELS = ("blockwise", "pallas")  # what computes a landmark step: this module's scan, or kernels_pallas.landmark


def _check_step_options(mask: Mask, logit: LogitOptions, blocks: BlockSizes | None, block_size: int,
                        kernel: str) -> None:
    """The options of a ring/Ulysses/USP call that a landmark step cannot take, named."""
    if not mask.causal or mask.window is not None or logit.softcap is not None:
        raise ValueError(
            f"landmark_step(block_size={block_size}) needs causal=True, window=None and softcap=None (the grouped "
            f"softmax is defined over earlier blocks), got causal={mask.causal}, window={mask.window}, "
            f"softcap={logit.softcap}."
        )
    for name in ("block_kv", "block_kv_bwd"):
        size = None if blocks is None else getattr(blocks, name)
        if size is None:
            continue
        if kernel == "pallas" and size != block_size:
            raise ValueError(f"{name}={size}: landmark_step(kernel='pallas') tiles the keys one landmark block at a "
                             f"time; leave {name} None (or {block_size}).")
        _check_kv_block(size, block_size, name)


def _step_static(block_size: int, tiles: BlockSizes | None, scale: float, kv_len: int) -> _Static:
    """Tiles ``(block_q, block_kv)`` of one step call (None: one landmark block of keys, Q_BLOCK queries), the
    key chunk cut to the call's keys as :func:`landmark_attention` does."""
    q_block, kv_block = (None, None) if tiles is None else (tiles.block_q, tiles.block_kv)
    kv_block = min(_check_kv_block(kv_block, block_size), -(-kv_len // block_size) * block_size)
    return _static(block_size, kv_block, scale, q_block)


def _kernels():
    from kernels_pallas import landmark  # only when a Pallas step is asked for

    return landmark


@dataclasses.dataclass(frozen=True)
class _StepForward:
    block_size: int
    kernel: str

    def __call__(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, mask, logit, blocks):
        _check_step_options(mask, logit, blocks, self.block_size, self.kernel)
        if self.kernel == "pallas":
            block_q = None if blocks is None else blocks.block_q
            return _kernels().step_forward(self.block_size, block_q, logit.scale, q, k, v, q_pos, kv_pos, q_seg,
                                           kv_seg)
        st = _step_static(self.block_size, blocks, logit.scale, k.shape[1])
        return _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


@dataclasses.dataclass(frozen=True)
class _StepBackward:
    block_size: int
    kernel: str

    def __call__(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, *, mask, logit, blocks):
        _check_step_options(mask, logit, blocks, self.block_size, self.kernel)
        tiles = None if blocks is None else blocks.backward
        if self.kernel == "pallas":
            return _kernels().step_backward(self.block_size, None if tiles is None else tiles.block_q, logit.scale,
                                            q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)
        st = _step_static(self.block_size, tiles, logit.scale, k.shape[1])
        return _backward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)


def landmark_step(block_size: int, *, kernel: str = "blockwise") -> LocalImpl:
    """Landmark attention as the local step of a sharded attention: pass it as ``impl=`` to
    :func:`lca.attention.ring_attention`, ``ulysses_attention``, ``usp_attention`` or their ``*_shard`` forms.

    >>> out = ring_attention(q, k, v, mesh=mesh, causal=True, impl=landmark_step(64))

    The result is :func:`landmark_attention` over the whole sequence (global positions decide the landmark
    roles, as there). Each key shard's ``(out, lse0)`` merges into the others' by log-sum-exp, and the
    backward gives each shard's exact share from the global output and ``lse0`` (the lse's cotangent too),
    provided every landmark block lies whole in one shard: the ring checks that its layout keeps aligned runs
    of ``block_size`` positions together (``zigzag`` or ``contiguous``, not ``striped``) and that each of its
    chunks holds whole blocks (a sequence length that is a multiple of ``2 n block_size`` for zigzag over
    ``n`` devices, ``n block_size`` for contiguous). Ulysses attends the whole sequence on each device.

    The call must be ``causal=True`` with no ``window`` or ``softcap`` (a ValueError names them otherwise).
    ``kernel``: ``"blockwise"`` (this module's scan) or ``"pallas"`` (the fused kernels of
    ``kernels_pallas.landmark``; interpreted off GPU, so inside your own ``shard_map`` it needs
    ``check_vma=False``). The call's ``block_q``/``block_kv`` tile the step (``block_kv`` a multiple of
    ``block_size``, and only ``block_size`` for pallas, whose key tile is one block; None: ``Q_BLOCK`` queries
    for blockwise, 64 for pallas, one landmark block of keys), ``block_q_bwd``/``block_kv_bwd`` the backward
    (None: as the forward).
    The same arguments give the same object, so jitted callers do not retrace. On one device,
    ``lca.attention.attention(q, k, v, impl=landmark_step(L), ...)`` is :func:`landmark_attention`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not a landmark step kernel; use one of {list(KERNELS)}.")
    return _landmark_step(_check_block_size(block_size), kernel)


@functools.cache
def _landmark_step(block_size: int, kernel: str) -> LocalImpl:
    # Its single-device function is landmark attention itself (lca.attention.attention(..., impl=) reaches it).
    single = _kernels().landmark_flash_attention if kernel == "pallas" else landmark_attention
    name = f"landmark_step({block_size})" if kernel == "blockwise" else f"landmark_step({block_size}, kernel='pallas')"
    return LocalImpl(name, functools.partial(single, block_size=block_size), _StepForward(block_size, kernel),
                     _StepBackward(block_size, kernel), check_vma=kernel != "pallas", key_runs=block_size)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Validated landmark inputs: positions int32 ``[len]``, segment ids ``[b, len]`` or None, the logit scale."""

    block_size: int
    scale: float
    q_positions: jax.Array
    kv_positions: jax.Array
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None


def resolve_inputs(q, k, v, *, block_size, causal=True, segment_ids=None, scale=None, q_positions=None,
                   kv_positions=None) -> Resolved:
    """Validate a blockwise or kernel call (ValueErrors name the argument) and fill in the defaults.

    Custom ``kv_positions`` must keep each aligned chunk of ``block_size`` keys in one landmark block
    (checked when concrete).
    """
    _check_causal(causal)
    block_size = _check_block_size(block_size)
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    logit = inputs.logit_options(d, scale)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    if kv_positions is not None:
        _check_aligned_positions(kv_positions, block_size)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    return Resolved(block_size, logit.scale, q_pos, kv_pos, q_seg, kv_seg)


# ------------------------------------------------------------------------------------------------ retrieval


@functools.partial(jax.tree_util.register_dataclass, data_fields=("keys", "values", "count"),
                   meta_fields=("capacity",))
@dataclasses.dataclass(frozen=True)
class BlockCache:
    """Complete landmark blocks that left the local window, oldest first: a buffer of ``slots`` blocks.

    keys: ``[batch, slots, L, num_kv_heads, head_dim]`` *before* rotary embeddings (retrieval re-positions
      them); slot ``L - 1`` of each block is its landmark key.
    values: same shape.
    count: int32 scalar, how many blocks hold data: buffer slots ``0 .. count - 1`` in age order; the rest
      are unused and never retrieved.
    capacity: None (unbounded: the buffer grows as blocks come, ``slots == count``, a new shape each time)
      or an int (preallocated: ``slots == capacity`` always, so a compiled step is reused; the oldest
      blocks are dropped when more come).
    """

    keys: jax.Array
    values: jax.Array
    count: jax.Array
    capacity: int | None = None

    @property
    def slots(self) -> int:
        """Blocks the buffer has room for (a static shape)."""
        return self.keys.shape[1]

    @property
    def block_size(self) -> int:
        return self.keys.shape[2]

    @property
    def landmark_keys(self):
        """``[batch, slots, num_kv_heads, head_dim]`` (unused slots included)."""
        return self.keys[:, :, -1]


def empty_block_cache(batch: int, block_size: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32,
                      capacity: int | None = None) -> BlockCache:
    """A cache holding no block yet; with a ``capacity``, its buffer is allocated here, once."""
    block_size = _check_block_size(block_size)
    capacity = positive_int("capacity", capacity, allow_none=True, hint=" (blocks kept; None: unbounded)")
    shape = (batch, capacity or 0, block_size, num_kv_heads, head_dim)
    return BlockCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), capacity)


def append_blocks(cache: BlockCache, k, v, num_blocks=None) -> BlockCache:
    """Add complete blocks ``k, v [batch, m * L, num_kv_heads, head_dim]`` (before rotary); keep ``capacity``.

    ``num_blocks`` (an int or a traced int32 scalar, default ``m``): only the first that many of the ``m``
    blocks are complete and added, so one compiled step can add 0 .. m blocks; it needs a capped cache
    (an unbounded one grows by exactly ``m``).
    """
    L = cache.block_size
    expect = (cache.keys.shape[0], None, *cache.keys.shape[3:])
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4 or x.shape[0] != expect[0] or x.shape[2:] != expect[2:] or x.shape[1] % L:
            raise ValueError(
                f"{name} must be [batch, m * block_size, num_kv_heads, head_dim] = [{expect[0]}, m * {L}, "
                f"{expect[2]}, {expect[3]}] (whole blocks ending with their landmark), got {getattr(x, 'shape', x)}."
            )
    m = k.shape[1] // L
    new_k = rearrange(k.astype(cache.keys.dtype), "b (m l) h d -> b m l h d", l=L)
    new_v = rearrange(v.astype(cache.values.dtype), "b (m l) h d -> b m l h d", l=L)
    if cache.capacity is None:
        if num_blocks is not None:
            raise ValueError("num_blocks needs a capped cache (empty_block_cache(..., capacity=...)): an unbounded "
                             f"cache grows by all m={m} blocks given.")
        keys, values = (jnp.concatenate([old, new], 1) for old, new in ((cache.keys, new_k), (cache.values, new_v)))
        return BlockCache(keys, values, cache.count + m, None)
    added = m if num_blocks is None else jnp.clip(num_blocks, 0, m)
    # Write the new blocks after the used slots, then keep the newest `capacity` in age order.
    filled = cache.count + added
    drop = jnp.maximum(filled - cache.capacity, 0)

    def place(old, new):
        room = jnp.concatenate([old, jnp.zeros_like(new)], axis=1)
        room = jax.lax.dynamic_update_slice_in_dim(room, new, cache.count, axis=1)
        return jax.lax.dynamic_slice_in_dim(room, drop, cache.capacity, axis=1)

    return BlockCache(place(cache.keys, new_k), place(cache.values, new_v),
                      jnp.minimum(filled, cache.capacity).astype(jnp.int32), cache.capacity)


def _no_rope(x, positions):
    del positions
    return x


def _stingy_slots(count, kk, slots: int):
    """Scoring slot of each buffer slot (age order): the ``kk`` most recent used blocks get 1..kk, older ones 0."""
    age = jnp.arange(slots)
    return jnp.where(age >= count - kk, age - (count - kk) + 1, 0)


def _select_blocks(q_rot, landmark_keys, used, top_k: int, selection: str, scale: float):
    """Top-k buffer slots per query ``[b, t, h, top_k]`` int32, ascending; unused slots (``~used``) rank last."""
    h_kv = landmark_keys.shape[2]
    qg = rearrange(q_rot, "b t (hk g) d -> b hk g t d", hk=h_kv).astype(jnp.float32)
    scores = jnp.einsum("bhgtd,bnhd->bhgtn", qg, landmark_keys.astype(jnp.float32)) * scale
    scores = jnp.where(used, rearrange(scores, "b hk g t n -> b t (hk g) n"), -jnp.inf)
    if selection == "shared":
        # A used block's softmax score may underflow to 0: mask again so that it still outranks unused ones.
        probs = jnp.where(used, jax.nn.softmax(scores, axis=-1), 0.0)
        scores = jnp.where(used, jnp.max(probs, axis=2, keepdims=True), -jnp.inf)
        scores = jnp.broadcast_to(scores, (*q_rot.shape[:3], scores.shape[-1]))
    _, idx = jax.lax.top_k(scores, top_k)
    # Sorted, the used slots retrieved come first: unused ones are the highest slots.
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def landmark_retrieval_attention(
    q,
    k,
    v,
    cache: BlockCache,
    *,
    block_size: int,
    top_k: int,
    selection: str = "per_head",
    rope=None,
    scale: float | None = None,
    window_len=None,
    return_indices: bool = False,
    q_tile: int | None = None,
):
    """Inference-time landmark attention: top-k cached blocks plus the local window, one grouped softmax.

    Args:
      q: ``[batch, t, num_heads, head_dim]`` queries of the current chunk, *before* rotary embeddings.
      k, v: ``[batch, s, num_kv_heads, head_dim]`` (``s >= t``, before rotary) the local window: every key
        after the last cached block, the chunk's own last; it starts on a block boundary, so local key
        ``j`` is the landmark of local block ``j // L`` iff ``j % L == L - 1``.
      cache: the complete blocks before the window (:class:`BlockCache`, same ``block_size``).
      block_size: ``L``.
      top_k: blocks retrieved per query (per head with ``selection="per_head"``) among the cache's used
        blocks; ``min(top_k, count)`` when it holds fewer; must not exceed a capped cache's capacity.
      selection: ``"per_head"`` (default, the reference code's) or ``"shared"`` (one set for all heads: max
        over heads of the per-head softmax of landmark scores, as in the paper).
      rope: ``rope(x [b, l, heads, d], positions [b, l]) -> x`` applied to queries and keys at the paper's
        retrieval positions (module docstring), e.g. ``lca.models.rope.apply_rope``; None = no rotation.
      scale: logit scale, default ``1 / sqrt(head_dim)``.
      window_len: how many of the ``s`` window keys hold tokens (an int or a traced int32 scalar, ``t ..
        s``; default ``s``): the queries are window keys ``window_len - t .. window_len - 1`` and the keys
        after them are unused room, so a fixed-size window buffer serves every step.
      return_indices: also return the retrieved buffer slots ``[batch, t, num_heads, R]`` (age order),
        ``R = top_k`` for a capped cache, else ``min(top_k, count)``; ``-1`` marks a rank with no used block.
      q_tile: attend for at most this many queries at a time (a ``lax.map`` over query tiles), so that a long
        prefill chunk holds ``q_tile x s`` local logits per head and gathers ``q_tile x num_heads x R`` blocks
        at once, instead of ``t x s`` and ``t x num_heads x R``; None (default): all ``t`` queries at once.
        The result does not depend on it.

    Returns:
      ``out [batch, t, num_heads, head_dim]`` in q's dtype (and the indices). Memory grows with ``k``
      blocks per query plus the landmark keys, not with the cached context.
    """
    block_size = _check_block_size(block_size)
    b, t, s, h, h_kv, d = inputs.check_qkv(q, k, v)
    if t > s:
        raise ValueError(f"the local window k, v {k.shape} must hold the chunk's queries q {q.shape} (s >= t).")
    if not isinstance(cache, BlockCache):
        raise ValueError(f"cache must be a BlockCache (empty_block_cache / append_blocks), got {type(cache)}.")
    if cache.keys.shape[0] != b or cache.keys.shape[2:] != (block_size, h_kv, d):
        raise ValueError(
            f"cache blocks {cache.keys.shape} must be [batch, n, block_size, num_kv_heads, head_dim] = "
            f"[{b}, n, {block_size}, {h_kv}, {d}] to match q {q.shape} and k {k.shape}."
        )
    _check_selection(top_k, selection, least=0)
    q_tile = positive_int("q_tile", q_tile, allow_none=True, hint=" (queries retrieved for at a time; None: all)")
    if cache.capacity is not None and top_k > cache.capacity:
        raise ValueError(
            f"top_k={top_k} is larger than the cache (capacity={cache.capacity} blocks); use "
            f"top_k <= {cache.capacity} or a larger capacity."
        )
    logit = inputs.logit_options(d, scale)
    rope = _no_rope if rope is None else rope
    L = block_size
    retrieved = min(int(top_k), cache.slots)  # static: ranks computed; those past `count` are masked
    kk = jnp.minimum(top_k, cache.count)  # blocks actually retrieved

    # Local window: positions (kk + 1) L + j, one grouped softmax chunk. Keys after the queries are
    # hidden by the causal mask, so the unused room of a window buffer needs no mask of its own.
    base = (kk + 1) * L
    local_pos = jnp.arange(s, dtype=jnp.int32)
    filled = s if window_len is None else window_len
    q_local = filled - t + jnp.arange(t, dtype=jnp.int32)
    batch_pos = lambda p: jnp.broadcast_to(p + base, (b, p.shape[0]))  # noqa: E731
    q_rot = rope(q, batch_pos(q_local))
    k_rot = rope(k, batch_pos(local_pos))
    padded = -(-s // L) * L
    widths = ((0, 0), (0, padded - s), (0, 0), (0, 0))
    k_blk = rearrange(jnp.pad(k_rot, widths).astype(jnp.float32), "b (n l) h d -> b n l h d", l=L)
    v_blk = rearrange(jnp.pad(v, widths).astype(jnp.float32), "b (n l) h d -> b n l h d", l=L)
    pos_blk = jnp.arange(padded, dtype=jnp.int32).reshape(-1, L)
    qg = rearrange(q_rot, "b t (hk g) d -> b hk g t d", hk=h_kv).astype(jnp.float32)
    if retrieved:
        used = jnp.arange(cache.slots) < cache.count
        slots = _stingy_slots(cache.count, kk, cache.slots)
        score_keys = rope(cache.landmark_keys, jnp.broadcast_to(slots * L + L - 1, (b, cache.slots)))

    def attend(q_rot, qg, q_local):
        """Some of the queries: the local window's grouped softmax, then the retrieved blocks folded in."""
        terms = _chunk_terms(qg, k_blk, v_blk, q_local, pos_blk, pos_blk < s, None, None, L, logit.scale)
        carry = _online_update(_empty_state(qg), terms, v_blk)
        if not retrieved:
            return carry, jnp.zeros((b, q_rot.shape[1], h, 0), jnp.int32)
        idx = _select_blocks(q_rot, score_keys, used, retrieved, selection, logit.scale)  # [b, t, h, R]
        return _fold_retrieved(carry, qg, cache, idx, kk, rope, logit.scale), idx

    if q_tile is None or q_tile >= t:
        carry, idx = attend(q_rot, qg, q_local)
    else:
        carry, idx = _by_query_tiles(attend, q_tile, q_rot, qg, q_local)
    idx = jnp.where(idx < cache.count, idx, -1)

    out, _ = _finish(*carry)
    out = rearrange(out, "b hk g t d -> b t (hk g) d").astype(q.dtype)
    return (out, idx) if return_indices else out


def landmark_decoded_attention(q, k, v, *, block_size: int, top_k: int, selection: str = "per_head", rope=None,
                               scale: float | None = None):
    """A whole row attended as greedy decoding attends it: block by block, each retrieving from the earlier ones.

    Block ``B`` of the row (its ``L`` queries) gets :func:`landmark_retrieval_attention` with its own keys as the
    local window and blocks ``0 .. B-1`` as the cache: its queries see their own block (causal) and, per
    query, the ``top_k`` earlier blocks the landmark scores pick, at the paper's retrieval positions. That is
    what a token meets when it is generated one at a time after a long context, where the training-time
    grouped softmax (:func:`landmark_attention`) shows it every earlier block at its true distance. Training
    some rows through this function (``model.mixers.landmark.train_retrieval``) teaches a model the
    re-positioned blocks; the block choice itself (``lax.top_k``) carries no gradient.

    Args:
      q: ``[batch, n, num_heads, head_dim]`` *before* rotary embeddings, ``n`` a multiple of ``block_size``;
        one document per row, starting at row index 0 (no segment ids: a caller with packed rows routes
        those through the grouped softmax instead).
      k, v: ``[batch, n, num_kv_heads, head_dim]``, k before rotary.
      block_size, top_k, selection, rope, scale: as in :func:`landmark_retrieval_attention`.

    Returns:
      ``[batch, n, num_heads, head_dim]`` in q's dtype. With ``top_k >= n // block_size`` it equals
      :func:`landmark_attention` of the rotated q and k (every block at its true distance).

    It computes densely what a per-block loop over :func:`landmark_retrieval_attention` computes (the test
    holds the two equal): every query against every key of every block once, the query rotated for each block
    to the slot that block takes (one copy of the queries per slot, ``top_k + 1``), so ``O(n^2)`` arithmetic
    and memory per row. That is the training rows' scale, where it is matmul-shaped: on a 2-core CPU, fwd+bwd
    of 4 rows of 384 tokens (top-4, L = 16) took about 2x the grouped softmax, where gathering the blocks per
    query took about 4x. Do not use it for long rows.
    """
    L = _check_block_size(block_size)
    b, t, s, h, h_kv, d = inputs.check_qkv(q, k, v)
    if t != s or t % L:
        raise ValueError(f"q {q.shape}, k {k.shape} must share a length that is a multiple of block_size={L} "
                         f"(rows of whole landmark blocks), got q_len={t}, kv_len={s}.")
    _check_selection(top_k, selection, least=1)
    scale = inputs.logit_options(d, scale).scale
    rope = _no_rope if rope is None else rope
    n = t // L
    most = min(int(top_k), n)
    # Per query: its block B, its slot a in the block, kk = min(top_k, B) blocks retrieved; the local window
    # (block B) starts at (kk + 1) L, as in landmark_retrieval_attention.
    block, a = jnp.arange(t) // L, jnp.arange(t) % L
    kk = jnp.minimum(most, block)
    at = lambda x, pos: rope(x, jnp.broadcast_to(pos, (b, t)))  # noqa: E731
    grouped = lambda x: rearrange(x, "b t (hk g) d -> b hk g t d", hk=h_kv).astype(jnp.float32)  # noqa: E731
    # A key of an earlier block at slot s sits at s L + l. Rotary sees differences only, so shift both sides by
    # -s L: the query at (kk + 1 - s) L + a (one copy per slot, small) against the key at l.
    q_slots = jnp.stack([grouped(at(q, (kk + 1 - s_) * L + a)) for s_ in range(most + 1)])
    keys = rearrange(at(k, a), "b (n l) h d -> b n l h d", l=L).astype(jnp.float32)
    j = jnp.arange(n)
    earlier = j[None, :] < block[:, None]  # [t, n]
    recent = j[None, :] >= (block - kk)[:, None]  # the kk most recent earlier blocks
    # Scoring: the paper's stingy slots, as landmark_retrieval_attention scores a cache of B blocks.
    score_slot = _stingy_slots(block[:, None], kk[:, None], n)  # [t, n]
    scores = _pick_slot(jnp.einsum("sbhgtd,bnhd->sbhgtn", q_slots, keys[:, :, L - 1]), score_slot) * scale
    scores = jnp.where(earlier, scores, -jnp.inf)
    if selection == "shared":
        probs = jnp.where(earlier, jax.nn.softmax(scores, axis=-1), 0.0)
        scores = jnp.where(earlier, jnp.max(probs, axis=(1, 2), keepdims=True), -jnp.inf)
    _, idx = jax.lax.top_k(scores, most)
    chosen = (jax.nn.one_hot(idx, n, dtype=jnp.int32).sum(-2) > 0) & earlier  # [b, hk, g, t, n]
    # Attending: the chosen blocks in age order take slots 0, 1, ..., one up when recent.
    slot = jnp.cumsum(chosen, axis=-1) - 1 + recent
    q_pair = _pick_slot(q_slots[..., None, :], slot[..., None])  # [b, hk, g, t, n, d]: the query as block j sees it
    logits = jnp.einsum("bhgtnd,bnlhd->bhgtnl", q_pair, keys) * scale
    values = rearrange(v, "b (n l) h d -> b n l h d", l=L).astype(jnp.float32)
    ordinary = jnp.arange(L) < L - 1
    inner = jax.nn.softmax(jnp.where(ordinary, logits, -jnp.inf), axis=-1)
    averages = jnp.einsum("bhgtnl,bnlhd->bhgtnd", inner, values)  # each chosen block's value
    pseudo = jnp.where(chosen, logits[..., L - 1], -jnp.inf)
    # Own block: ordinary keys up to the query (never its own landmark), at true distances.
    local = rearrange(grouped(at(q, a)), "b hk g (n a) d -> b hk g n a d", a=L)  # true in-block distances
    own = jnp.einsum("bhgnad,bnchd->bhgnac", local, keys) * scale
    own = jnp.where((jnp.arange(L)[None, :] <= jnp.arange(L)[:, None]) & ordinary, own, -jnp.inf)
    own = rearrange(own, "b hk g n a c -> b hk g (n a) c")
    weights = jax.nn.softmax(jnp.concatenate([own, pseudo], axis=-1), axis=-1)  # one group 0 per query
    own_weights = rearrange(weights[..., :L], "b hk g (n a) c -> b hk g n a c", a=L)
    out = (rearrange(jnp.einsum("bhgnac,bnchd->bhgnad", own_weights, values), "b hk g n a d -> b hk g (n a) d")
           + jnp.einsum("bhgtn,bhgtnd->bhgtd", weights[..., L:], averages))
    return rearrange(out, "b hk g t d -> b t (hk g) d").astype(q.dtype)


def _pick_slot(x, slot):
    """``x[slot]`` elementwise: ``x [slots, ...]``, ``slot`` int broadcasting against ``x[0]`` (a select chain, whose
    gradient stays elementwise, unlike a gather's scatter)."""
    out = x[0]
    for s in range(1, x.shape[0]):
        out = jnp.where(slot == s, x[s], out)
    return out


def _by_query_tiles(attend, tile: int, q_rot, qg, q_pos):
    """``attend(q_rot, qg, q_pos) -> (carry, idx)`` over tiles of ``tile < t`` queries in turn (``lax.map``).

    Queries are axis 1 of ``q_rot [b, t, h, d]`` and of idx, axis 3 of ``qg [b, hk, g, t, d]`` and of the
    softmax state ``carry``, axis 0 of their window positions ``q_pos [t]``; the last tile is padded with zero
    queries at position 0, whose rows are dropped.
    """
    t = q_rot.shape[1]
    carry, idx = jax.lax.map(lambda x: attend(*x), _q_tiles(tile, t, (q_rot, 1), (qg, 3), (q_pos, 0)))
    return tuple(_untile(c, 3, t) for c in carry), _untile(idx, 1, t)


def _fold_retrieved(carry, qg, cache: BlockCache, idx, kk, rope, scale: float):
    """Add the retrieved blocks, as landmark pseudo-keys, to group 0's running state (unused slots add 0)."""
    b, h_kv, g, t, d = qg.shape
    L = cache.block_size
    count = cache.count
    r = idx.shape[-1]
    head_kv = jnp.arange(h_kv * g) // g  # the kv head each query head reads
    # keys[b, idx[b, t, h, r], :, head_kv[h]] -> [b, t, h, r, L, d]
    bi = jnp.arange(b)[:, None, None, None]
    keys = cache.keys[bi, idx, :, head_kv[None, None, :, None]]
    values = cache.values[bi, idx, :, head_kv[None, None, :, None]].astype(jnp.float32)
    # Paper positions: rank r in age order, one slot up for the kk most recent blocks.
    slot = jnp.arange(r) + (idx >= count - kk)  # [b, t, h, R]
    positions = slot[..., None] * L + jnp.arange(L)  # [b, t, h, R, L]
    keys = rope(keys.reshape(b, -1, 1, d), positions.reshape(b, -1)).reshape(keys.shape)
    x = jnp.einsum("bthd,bthrld->bthrl", rearrange(qg, "b hk g t d -> b t (hk g) d"), keys.astype(jnp.float32)) * scale
    ordinary = jnp.arange(L) < L - 1
    masked = jnp.where(ordinary, x, -jnp.inf)
    unnorm = jnp.exp(masked - jnp.max(masked, axis=-1, keepdims=True))
    average = jnp.einsum("bthrl,bthrld->bthrd", unnorm / unnorm.sum(-1, keepdims=True), values)
    landmark_x = jnp.where(idx < count, x[..., L - 1], -jnp.inf)
    landmark_x = rearrange(landmark_x, "b t (hk g) r -> b hk g t r", hk=h_kv)
    average = rearrange(average, "b t (hk g) r d -> b hk g t r d", hk=h_kv)

    row_max, row_sum, acc = carry
    new_max = jnp.maximum(row_max, jnp.max(landmark_x, axis=-1))
    safe = _finite(new_max)
    rescale = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max - safe, -jnp.inf))
    p = jnp.exp(landmark_x - safe[..., None])
    return (
        new_max,
        row_sum * rescale + p.sum(-1),
        acc * rescale[..., None] + jnp.einsum("bhgtr,bhgtrd->bhgtd", p, average),
    )
