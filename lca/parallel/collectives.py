"""Sequence <-> head exchanges inside ``jax.shard_map``, for head-parallel (Ulysses-style) attention.

With a sequence split over the ``n`` devices of a mesh axis, one ``all_to_all``
turns each ``[b, T/n, h, d]`` sequence shard into a ``[b, T, h/n, d]`` head
shard (every device then holds the whole sequence for ``h/n`` heads), and one
more turns the result back. Per-token metadata (positions, segment ids) has no
head axis and is gathered whole instead.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def seq_to_heads(x, axis_name, repeat: int = 1):
    """``[b, T/n, h, d]`` sequence shard -> ``[b, T, h/n, d]`` head shard.

    ``repeat``: how often each head is repeated first (kv heads fewer than ``n``:
    GQA/MQA), so that the heads split evenly over the axis.
    """
    if repeat > 1:
        x = jnp.repeat(x, repeat, axis=2)
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x, axis_name, *, seq_axis: int = 1, head_axis: int = 2):
    """Inverse of :func:`seq_to_heads` (``lse [b, h/n, T]``: ``seq_axis=2, head_axis=1``)."""
    return lax.all_to_all(x, axis_name, split_axis=seq_axis, concat_axis=head_axis, tiled=True)


def gather_seq(x, axis_name, seq_axis: int = 1):
    """All shards' positions / segment ids along the sequence (None stays None)."""
    if x is None:
        return None
    return lax.all_gather(x, axis_name, axis=seq_axis, tiled=True)
