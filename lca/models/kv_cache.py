"""A key/value cache for causal attention layers at inference: a fixed-size buffer and a fill count.

Every decoding step has the same shapes (one compiled step). Two layouts:

* a full buffer with room for ``max_len`` tokens: token ``s`` of the sequence sits in slot ``s``;
  :func:`attend_cached` writes the next ``t`` keys and values at ``length`` and attends with positions
  ``length .. length + t - 1`` against the slots, so the causal mask hides the slots not written yet;
* for a sliding window ``W`` (``window=W`` to :func:`empty_kv_cache`, when ``W < max_len``), a ring of
  ``W`` slots: token ``s`` sits in slot ``s mod W`` and ``slot_positions`` says which token each slot holds.
  The next ``t`` tokens attend over the ring and themselves, then their last ``min(t, W)`` overwrite the
  oldest slots. Memory and work per token are ``O(W)``, not ``O(max_len)``, and the sequence may run past
  ``max_len``: what a local layer or a Titans MAG/MAL window needs for long generation.

Visibility comes from positions (:mod:`lca.attention.mask`), so both layouts give the same outputs.

How the ``t`` new queries attend: when their logits over the slots would hold more than one
``block_q x block_kv`` tile (a prefill chunk), blockwise (:func:`lca.attention.blockwise_attention`):
memory ``O(t x block_kv)`` per head instead of ``O(t x slots)``, and key blocks the queries cannot see (the
slots past the fill, those outside a window) are skipped, so a prefill of ``p`` tokens does ``O(p^2 / 2)``
work, not ``O(p x max_len)``. Otherwise (decoding a few tokens) dense, as before: one small ``[t, slots]``
product per head. Both read every slot; on a CPU the blockwise pass was no slower for one token, but on an
accelerator its loop costs kernels per key block, which nobody has timed, so decoding keeps the product.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from lca.attention.blocks import BlockSizes
from lca.attention.blockwise import DEFAULT_BLOCKS, blockwise_attention
from lca.attention.reference import reference_attention

EMPTY = -(2**30)  # an empty ring slot's position: outside every window of a real token


@functools.partial(jax.tree_util.register_dataclass, data_fields=("keys", "values", "length", "slot_positions"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: jax.Array  # [b, slots, num_kv_heads, head_dim], rotary embeddings applied
    values: jax.Array  # [b, slots, num_kv_heads, head_dim]
    length: jax.Array  # int32 scalar: tokens seen so far
    # Ring buffers only: [slots] int32, the position of the token each slot holds (EMPTY: none yet).
    slot_positions: Optional[jax.Array] = None


def empty_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype,
                   window: int | None = None) -> KVCache:
    """An empty cache for ``max_len`` tokens, or a ring of ``window`` slots when ``window < max_len``."""
    if window is not None and window < max_len:
        shape = (batch, window, num_kv_heads, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32),
                       jnp.full((window,), EMPTY, jnp.int32))
    shape = (batch, max_len, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def attend_cached(q, k, v, cache: KVCache, *, window=None, softcap=None, scale=None, return_lse=False,
                  block_q: int | None = None, block_kv: int | None = None):
    """Causal attention of the next ``t`` tokens over the cache and themselves; ``(out, cache)``.

    ``q [b, t, h, d]``, ``k, v [b, t, h_kv, d]`` (rotary applied at their positions). A full buffer must
    have room for them (``length + t <= max_len``; not checked when ``length`` is traced); a ring takes any
    number, and its ``window`` must be at most its slots. ``return_lse``: ``out`` is ``(out, lse [b, h, t])``,
    as :func:`lca.attention.reference_attention` returns it. ``block_q``, ``block_kv``: the tiles of a
    blockwise pass (None: blockwise's 512), which runs when the ``[t, slots]`` logits exceed one tile
    (module docstring).
    """
    slots, t = cache.keys.shape[1], q.shape[1]
    blocks = BlockSizes(block_q, block_kv).or_defaults(DEFAULT_BLOCKS)
    options = dict(causal=True, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
                   blocks=blocks)
    q_positions = cache.length + jnp.arange(t, dtype=jnp.int32)
    if cache.slot_positions is not None:
        if window is None or window > slots:
            raise ValueError(f"a ring KV cache of {slots} slots holds the last {slots} tokens only; it serves "
                             f"window <= {slots}, got window={window}. Make it with empty_kv_cache(..., "
                             f"window={window}) or without a window for a full buffer.")
        return _attend_ring(q, k, v, cache, q_positions, options)
    if t > slots:
        raise ValueError(f"{t} new tokens do not fit a KV cache of max_len={slots}.")
    start = (0, cache.length, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start)
    values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start)
    out = _attention(q, keys, values, q_positions, jnp.arange(slots, dtype=jnp.int32), **options)
    return out, KVCache(keys, values, cache.length + t)


def _attend_ring(q, k, v, cache: KVCache, q_positions, options):
    """:func:`attend_cached` on a ring: over the ring and the new tokens, then the newest ``min(t, W)`` stay."""
    slots, t = cache.keys.shape[1], q.shape[1]
    k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
    out = _attention(q, jnp.concatenate([cache.keys, k], axis=1), jnp.concatenate([cache.values, v], axis=1),
                     q_positions, jnp.concatenate([cache.slot_positions, q_positions]), **options)
    kept = min(t, slots)  # the newest tokens; distinct slots, since kept <= slots
    at = q_positions[t - kept:] % slots
    return out, KVCache(cache.keys.at[:, at].set(k[:, t - kept:]), cache.values.at[:, at].set(v[:, t - kept:]),
                        cache.length + t, cache.slot_positions.at[at].set(q_positions[t - kept:]))


def _attention(q, k, v, q_positions, kv_positions, *, blocks: BlockSizes, **options):
    """Dense when the ``[t, kv_len]`` logits fit one ``blocks`` tile, else blockwise (module docstring)."""
    if q.shape[1] * k.shape[1] <= blocks.block_q * blocks.block_kv:
        return reference_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions, **options)
    return blockwise_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                               block_q=blocks.block_q, block_kv=blocks.block_kv, **options)
