"""lca's attention family: one signature, one mask, one merge, one oracle.

All variants take ``q [batch, q_len, num_heads, head_dim]`` and
``k, v [batch, kv_len, num_kv_heads, head_dim]`` and follow the semantics of
:func:`reference_attention`.

* Local implementations (one device): ``reference``, ``xla``, ``blockwise``,
  ``pallas``, ``cudnn``, listed in :data:`lca.attention.impl.IMPLS` and reached through
  :func:`attention` (``impl=...``).
* Sequence-parallel strategies: ring, Ulysses, USP (one module each), sharing
  the entry plumbing and call spec of :mod:`lca.attention.sharded`; each runs a
  local implementation's step on every device.
"""

from lca.attention.blocks import BlockSizes
from lca.attention.blockwise import blockwise_attention, blockwise_backward, blockwise_forward
from lca.attention.dispatch import attention
from lca.attention.impl import IMPLS, LocalImpl, get_impl
from lca.attention.logits import LogitOptions
from lca.attention.landmark import (
    BlockCache,
    append_blocks,
    empty_block_cache,
    landmark_attention,
    landmark_decoded_attention,
    landmark_reference_attention,
    landmark_retrieval_attention,
    landmark_step,
    landmark_weights,
)
from lca.attention.mask import Mask
from lca.attention.merge import merge_attention, merge_lse
from lca.attention.reference import reference_attention
from lca.attention.ring import ring_attention, ring_attention_shard, ring_schedule
from lca.attention.ulysses import ulysses_attention, ulysses_attention_shard
from lca.attention.usp import usp_attention, usp_attention_shard
from lca.attention.xla import xla_attention

__all__ = [
    "BlockCache",
    "BlockSizes",
    "IMPLS",
    "LocalImpl",
    "LogitOptions",
    "Mask",
    "append_blocks",
    "attention",
    "blockwise_attention",
    "blockwise_backward",
    "blockwise_forward",
    "empty_block_cache",
    "get_impl",
    "landmark_attention",
    "landmark_decoded_attention",
    "landmark_reference_attention",
    "landmark_retrieval_attention",
    "landmark_step",
    "landmark_weights",
    "merge_attention",
    "merge_lse",
    "reference_attention",
    "ring_attention",
    "ring_attention_shard",
    "ring_schedule",
    "ulysses_attention",
    "ulysses_attention_shard",
    "usp_attention",
    "usp_attention_shard",
    "xla_attention",
]
