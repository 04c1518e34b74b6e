"""Exact merge of attention results over disjoint key sets, through their log-sum-exp.

If ``(out_a, lse_a)`` is attention of some queries over keys ``A`` and
``(out_b, lse_b)`` over disjoint keys ``B``, then attention over ``A | B`` is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

This is the one merge that ring attention, the kernels and any split-KV scheme
use. Everything is float32 so errors do not grow with the number of merges.
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange


def _weights(lse, total):
    # exp(lse - total), 0 where this part saw no key (lse == -inf), finite grads.
    finite = jnp.isfinite(total)
    return jnp.where(finite, jnp.exp(lse - jnp.where(finite, total, 0.0)), 0.0)


def merge_lse(lse_a, lse_b):
    """``log(exp(a) + exp(b))`` that is ``-inf`` when both are, with finite gradients."""
    hi = jnp.maximum(lse_a, lse_b)
    hi_safe = jnp.where(jnp.isfinite(hi), hi, 0.0)
    total = jnp.exp(lse_a - hi_safe) + jnp.exp(lse_b - hi_safe)
    has = total > 0
    return jnp.where(has, hi_safe + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Merge two partial attention results over disjoint key sets.

    Args:
      out_a, out_b: ``[batch, q_len, num_heads, head_dim]`` partial outputs,
        each normalised over its own keys (0 where it saw none).
      lse_a, lse_b: ``[batch, num_heads, q_len]`` float32 log-sum-exps
        (``-inf`` where that part saw no key).

    Returns:
      ``(out [batch, q_len, num_heads, head_dim] float32, lse [batch, num_heads, q_len] float32)``.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"merge_attention needs matching shapes, got out {out_a.shape} vs {out_b.shape} "
            f"and lse {lse_a.shape} vs {lse_b.shape}."
        )
    b, q_len, h, _ = out_a.shape
    if lse_a.shape != (b, h, q_len):
        raise ValueError(
            f"lse must be [batch, num_heads, q_len] = {(b, h, q_len)} for out {out_a.shape}, "
            f"got {lse_a.shape}."
        )
    lse_a = lse_a.astype(jnp.float32)
    lse_b = lse_b.astype(jnp.float32)
    lse = merge_lse(lse_a, lse_b)
    w_a = rearrange(_weights(lse_a, lse), "b h q -> b q h 1")
    w_b = rearrange(_weights(lse_b, lse), "b h q -> b q h 1")
    out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
    return out, lse
