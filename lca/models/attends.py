"""What one layer's attention attends: the shape of its query-key products, for the analytic FLOP count.

A mixer section with attention says so through an optional ``attends(self, model) -> Attends``
(:mod:`lca.models.mixers`); :mod:`lca.train.flops` turns it into FLOPs for a batch's documents.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Attends:
    """The (query, key) pairs a layer's ``QK^T`` and ``PV`` products span, per token of a sequence.

    * ``width``: ``heads x head_dim`` of those products (a pair costs ``2 x 2 x width`` FLOPs forward);
    * ``window``: None: causal over the whole document; ``W``: causal over the last ``W`` keys;
    * ``prefix``: keys every query also sees (Titans' persistent tokens);
    * ``segment``: Titans MAC: causal within the row's consecutive segments of this many tokens,
      over two key sets of a segment's length (the memory's retrieval and the segment itself). It
      cuts rows, not documents: MAC's dense segment attention masks packed documents apart but computes
      every pair of the segment all the same; ``window`` is then unused.
    """

    width: int
    window: Optional[int] = None
    prefix: int = 0
    segment: Optional[int] = None
