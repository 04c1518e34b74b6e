"""The dense oracle: plain, obviously right attention that every variant is tested against."""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange

from lca.attention import inputs, nonfinite
from lca.attention.mask import segment_visible


def reference_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    q_positions=None,
    kv_positions=None,
):
    """Dense softmax attention with lca's exact semantics.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]`` with
        ``num_heads % num_kv_heads == 0`` (MHA, GQA, MQA).
      causal: query at position ``p`` sees keys at positions ``<= p``; positions
        are bottom-right aligned (query ``i`` is at ``i + kv_len - q_len``).
      segment_ids: ``[batch, len]`` int (self-attention) or a pair
        ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])``;
        queries only see keys of the same segment.
      window: sliding window ``W``: ``|p - s| < W``.
      softcap: logits become ``softcap * tanh(logits / softcap)`` before masking.
      scale: logit scale, default ``1 / sqrt(head_dim)``.
      return_lse: also return the log-sum-exp of the masked logits.
      q_positions, kv_positions: optional int ``[q_len]`` / ``[kv_len]`` token
        positions overriding the bottom-right default (for permuted layouts).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype, and with
      ``return_lse`` also ``lse [batch, num_heads, q_len]`` float32. A query with
      no visible key gets ``out == 0`` and ``lse == -inf``. A NaN or inf in a key
      or value changes only the outputs of the queries that see that key.
    """
    b, q_len, kv_len, h, h_kv, d = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    logit = inputs.logit_options(d, scale, softcap)
    mask = inputs.make_mask(causal, window)
    q_positions, kv_positions = inputs.positions(q_positions, kv_positions, q_len, kv_len)

    # Masks select, never multiply: a non-finite key or value reaches only the
    # rows that see it (as NaN logits), and the products get zeros in its place,
    # so no 0 * NaN reaches the other rows' outputs or gradients.
    key_ok = rearrange(nonfinite.finite_keys(k, v), "b k hk -> b hk 1 1 k")
    k, v = nonfinite.backward_operands(k, v)
    qg = rearrange(q, "b q (hk g) d -> b hk g q d", hk=h_kv).astype(jnp.float32)
    scores = jnp.einsum("bhgqd,bkhd->bhgqk", qg, k.astype(jnp.float32))
    logits = jnp.where(key_ok, logit.apply(scores), jnp.nan)

    visible = mask.visible(q_positions, kv_positions)[None]  # [1, q, kv]
    if segs is not None:
        visible = visible & segment_visible(*segs)
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)

    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnorm = jnp.exp(logits - row_max)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    has_key = denom > 0
    # Double `where`: keeps gradients of fully masked rows finite (zero, not NaN).
    safe_denom = jnp.where(has_key, denom, 1.0)
    probs = unnorm / safe_denom
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    out = rearrange(out, "b q hk g d -> b q (hk g) d").astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(has_key, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]
    return out, rearrange(lse, "b hk g q -> b (hk g) q")
