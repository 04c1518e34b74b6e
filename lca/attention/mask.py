"""The one mask definition shared by every attention variant in lca.

Visibility is decided from token *positions* and *segment ids*, never from array
indices, so the same rule serves the dense oracle, blockwise loops, ring steps
whose key chunk sits elsewhere in the global sequence, permuted (zigzag/striped)
layouts and the Pallas kernels.

Positions live in the key coordinate frame: key ``j`` of a plain call sits at
position ``j`` and query ``i`` at ``i + (kv_len - q_len)`` (bottom-right
alignment, as in FlashAttention since 2.1; ``jax.nn.dot_product_attention`` aligns
``is_causal`` top-left instead, which is why ``lca.attention.xla_attention``
builds its own mask when the lengths differ).

A query at position ``p`` sees a key at position ``s`` iff

* ``causal``:  ``s <= p``
* ``window=W``: ``|p - s| < W`` (with ``causal`` that is the W most recent keys,
  the query's own included)
* segments: the two segment ids are equal (packed documents). A document (or a
  padding run) begins where a row's id differs from the one before it
  (:func:`segment_begins`), the rule the packed-layout and memory code reads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention.static import positive_int


@dataclasses.dataclass(frozen=True)
class Mask:
    """Causal and/or sliding-window visibility over token positions.

    Hashable and static, so it can be a ``jit`` static argument or a
    ``custom_vjp`` non-differentiable argument.
    """

    causal: bool = False
    window: int | None = None

    def __post_init__(self):
        # Integer-likes (np.int64) become a plain int, so equal masks hash equal.
        window = positive_int("window", self.window, allow_none=True,
                              hint=" (W >= 1 keeps the query's own position)")
        object.__setattr__(self, "window", window)

    @property
    def is_full(self) -> bool:
        """True when positions play no role (every key is visible)."""
        return not self.causal and self.window is None

    def visible(self, q_pos, kv_pos):
        """Boolean ``[..., q, kv]`` visibility from positions ``[..., q]`` and ``[..., kv]``."""
        diff = q_pos[..., :, None] - kv_pos[..., None, :]
        ok = jnp.ones(diff.shape, dtype=bool)
        if self.causal:
            ok = ok & (diff >= 0)
        if self.window is not None:
            ok = ok & (jnp.abs(diff) < self.window)
        return ok

    def block_visible(self, q_lo, q_hi, kv_lo, kv_hi):
        """Could any query in ``[q_lo, q_hi]`` see any key in ``[kv_lo, kv_hi]``?

        Conservative (it may say yes for an empty block whose positions are not
        contiguous) and exact for contiguous blocks. This is what lets loops and
        kernels skip key blocks that causal or window masking hides entirely.
        """
        # q - kv ranges over [q_lo - kv_hi, q_hi - kv_lo].
        lo, hi = q_lo - kv_hi, q_hi - kv_lo
        ok = jnp.asarray(True)
        if self.causal:
            ok = ok & (hi >= 0)
        if self.window is not None:
            # Some difference d in [lo, hi] with |d| < W.
            ok = ok & (hi > -self.window) & (lo < self.window)
        return ok

    def block_full(self, q_lo, q_hi, kv_lo, kv_hi):
        """Does every query in ``[q_lo, q_hi]`` see every key in ``[kv_lo, kv_hi]``?

        Exact for any positions in those ranges (it bounds every difference), so
        a loop may drop the mask of such a block (segments and padding aside).
        """
        lo, hi = q_lo - kv_hi, q_hi - kv_lo
        ok = jnp.asarray(True)
        if self.causal:
            ok = ok & (lo >= 0)
        if self.window is not None:
            ok = ok & (hi < self.window) & (lo > -self.window)
        return ok


def segment_visible(q_seg, kv_seg):
    """Boolean ``[b, q, kv]`` from segment ids ``[b, q]`` and ``[b, kv]``."""
    return q_seg[:, :, None] == kv_seg[:, None, :]


def segment_begins(segment_ids):
    """``[..., n]`` bool from segment ids ``[..., n]``: True where a run of equal ids begins, at index 0 and
    wherever an id differs from the one before it.

    The one rule for where a packed document (or padding run) starts. numpy in, numpy out (host-side data
    and FLOP counting); a jax array in, a jax array out, sharded as it came (ids whose sequence explicit
    mesh axes split are compared unsplit: JAX cannot slice a split axis by one).
    """
    host = isinstance(segment_ids, np.ndarray)
    spec = () if host else jax.typeof(segment_ids).sharding.spec
    split = len(spec) == segment_ids.ndim and spec[-1] is not None
    if split:  # explicit axes split the sequence, where a shifted compare cannot slice: unsplit the (small) ids
        segment_ids = jax.sharding.reshard(segment_ids, jax.P(*spec[:-1], None))
    changes = segment_ids[..., 1:] != segment_ids[..., :-1]
    begins = (np if host else jnp).pad(changes, [(0, 0)] * (changes.ndim - 1) + [(1, 0)], constant_values=True)
    return jax.sharding.reshard(begins, spec) if split else begins


def segment_ranges_meet(q_lo, q_hi, kv_lo, kv_hi):
    """Elementwise: do a query block's and a key block's segment-id ranges overlap?

    ``q_lo, q_hi, kv_lo, kv_hi``: the least and greatest segment id in the query
    block and in the key block (any broadcastable shapes). Disjoint ranges mean no
    equal pair, so this is conservative and never wrong. In packed rows (ids
    growing along the sequence) blocks a few documents apart have disjoint ranges,
    which lets a loop skip them as it skips causally hidden ones.
    """
    return (q_lo <= kv_hi) & (kv_lo <= q_hi)


def segment_ranges_one(q_lo, q_hi, kv_lo, kv_hi):
    """Elementwise: is every query of the block in the segment of every key (one id on both sides)?"""
    return (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)


def segment_block_visible(q_lo, q_hi, kv_lo, kv_hi):
    """Could a query block see a key block through its segment ids in any batch row (``[b]`` ranges)?"""
    return jnp.any(segment_ranges_meet(q_lo, q_hi, kv_lo, kv_hi))


def segment_block_full(q_lo, q_hi, kv_lo, kv_hi):
    """Is every query of the block in the segment of every key, in every batch row (``[b]`` ranges)?"""
    return jnp.all(segment_ranges_one(q_lo, q_hi, kv_lo, kv_hi))


def default_positions(q_len: int, kv_len: int):
    """Bottom-right aligned positions: ``(q_pos [q_len], kv_pos [kv_len])`` int32."""
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len)
    return q_pos, kv_pos
