"""Rotary position embeddings (RoFormer), from explicit token positions."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotate ``x [b, l, h, d]`` (even ``d``) by angles ``positions [b, l] * theta**(-2i/d)``.

    Positions come from the batch rather than ``arange(l)`` so that documents
    packed into one row each start at position 0. Computed in float32, returned
    in ``x.dtype``.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got x.shape={x.shape}.")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must be [batch, len] = {x.shape[:2]}, got {positions.shape}.")
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, d/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
