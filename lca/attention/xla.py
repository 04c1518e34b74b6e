"""``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPU) behind lca's signature."""

from __future__ import annotations

import jax


def xla_attention(q, k, v, *, causal, segment_ids=None, window=None, softcap=None, scale=None):
    """``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPU) behind lca's signature.

    No softcap (XLA's fused attention has none); segment ids become a boolean mask.
    """
    if softcap is not None:
        raise ValueError(f"attention kind 'xla' has no softcap; got softcap={softcap}. Use 'blockwise'.")
    mask = None
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [b, 1, q, kv]
    # lca's window |i - j| < W is XLA's (left, right) = (W - 1, W - 1).
    local = None if window is None else (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, local_window_size=local
    ).astype(q.dtype)
