"""A key/value cache for causal attention layers at inference: a fixed-size buffer and a fill count.

The buffer has room for ``max_len`` tokens so that every decoding step has the same shapes (one compiled
step). Token ``s`` of the sequence sits in slot ``s``; :func:`attend_cached` writes the next ``t`` keys
and values at ``length`` and attends with positions ``length .. length + t - 1`` against the slots, so the
causal mask hides the slots not written yet and a window keeps its meaning.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lca.attention.reference import reference_attention


@functools.partial(jax.tree_util.register_dataclass, data_fields=("keys", "values", "length"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: jax.Array  # [b, max_len, num_kv_heads, head_dim], rotary embeddings applied
    values: jax.Array  # [b, max_len, num_kv_heads, head_dim]
    length: jax.Array  # int32 scalar: slots filled


def empty_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, max_len, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def attend_cached(q, k, v, cache: KVCache, *, window=None, softcap=None, scale=None, return_lse=False):
    """Causal attention of the next ``t`` tokens over the cache and themselves; ``(out, cache)``.

    ``q [b, t, h, d]``, ``k, v [b, t, h_kv, d]`` (rotary applied at their positions); the cache must have
    room for them (``length + t <= max_len``; not checked when ``length`` is traced). ``return_lse``:
    ``out`` is ``(out, lse [b, h, t])``, as :func:`lca.attention.reference_attention` returns it.
    """
    max_len = cache.keys.shape[1]
    if q.shape[1] > max_len:
        raise ValueError(f"{q.shape[1]} new tokens do not fit a KV cache of max_len={max_len}.")
    start = (0, cache.length, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start)
    values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start)
    q_positions = cache.length + jnp.arange(q.shape[1], dtype=jnp.int32)
    out = reference_attention(q, keys, values, causal=True, window=window, softcap=softcap, scale=scale,
                              q_positions=q_positions, kv_positions=jnp.arange(max_len, dtype=jnp.int32),
                              return_lse=return_lse)
    return out, KVCache(keys, values, cache.length + q.shape[1])
