"""``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPU) behind lca's signature and semantics.

The dense fused attention of XLA has neither a softcap nor an lse output, and
its ``is_causal`` aligns queries top-left. lca aligns them bottom-right (query
``i`` sits at position ``i + kv_len - q_len``), so when the lengths differ, or
positions are given, the mask is built from positions here and passed as a
boolean ``mask``; equal lengths keep XLA's own causal/window arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.attention import inputs
from lca.attention.mask import segment_visible


def xla_attention(
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
    """Dense attention through ``jax.nn.dot_product_attention``, as ``reference_attention``.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``; k, v: ``[batch, kv_len,
        num_kv_heads, head_dim]``.
      causal, segment_ids, window, scale, q_positions, kv_positions: as in
        ``reference_attention`` (bottom-right causal alignment).
      softcap, return_lse: not supported (``ValueError``; use ``blockwise``).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype; a query with no
      visible key gets 0, as everywhere in lca.
    """
    _, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    if softcap is not None:
        raise ValueError(
            f"impl='xla' has no softcap (XLA's fused attention has none), got softcap={softcap}; "
            f"use impl='blockwise' (or 'reference', 'pallas')."
        )
    if inputs.flag("return_lse", return_lse):
        raise ValueError(
            "impl='xla' cannot return the lse (jax.nn.dot_product_attention does not expose "
            "it); use impl='blockwise' (or 'reference', 'pallas') with return_lse=True."
        )
    segs = inputs.split_segment_ids(segment_ids, q.shape[0], q_len, kv_len)
    mask = inputs.make_mask(causal, window)
    logit = inputs.logit_options(d, scale, None)
    paired = isinstance(segment_ids, (tuple, list))
    positional = q_positions is not None or kv_positions is not None or paired or (
        q_len != kv_len and not mask.is_full)
    if not positional:
        # Equal lengths: top-left is bottom-right, and every query sees itself (no empty rows).
        seg_mask = None if segs is None else segment_visible(*segs)[:, None]  # [b, 1, q, kv]
        # lca's window |i - j| < W is XLA's (left, right) = (W - 1, W - 1).
        local = None if mask.window is None else (mask.window - 1,
                                                  0 if mask.causal else mask.window - 1)
        out = jax.nn.dot_product_attention(q, k, v, mask=seg_mask, scale=logit.scale,
                                           is_causal=mask.causal, local_window_size=local)
        return out.astype(q.dtype)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    visible = mask.visible(q_pos, kv_pos)[None]  # [1, q, kv]
    if segs is not None:
        visible = visible & segment_visible(*segs)
    out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], scale=logit.scale)
    # XLA gives a row with no visible key the mean of v; lca's semantics give 0.
    has_key = jnp.any(visible, axis=-1)[:, :, None, None]  # [b or 1, q, 1, 1]
    return jnp.where(has_key, out, 0).astype(q.dtype)
