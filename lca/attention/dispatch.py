"""``attention(q, k, v, *, impl=...)``: single-device attention by implementation name.

``impl="blockwise"`` runs :func:`lca.attention.blockwise_attention` (pure JAX,
O(n) memory); ``impl="pallas"`` runs ``kernels_pallas.flash_attention`` (fused
kernels; interpreted on CPU). Shapes: ``q [b, q_len, h, d]``,
``k, v [b, kv_len, h_kv, d]`` -> ``out [b, q_len, h, d]`` (and ``lse [b, h, q_len]``).
"""

from __future__ import annotations

import importlib

from lca.attention.blockwise import blockwise_attention

IMPLS = ("blockwise", "pallas")


def attention(q, k, v, *, impl: str = "blockwise", **options):
    """Attention with ``reference_attention`` semantics through ``impl``.

    ``options`` are the keyword arguments of the chosen function (``causal``,
    ``segment_ids``, ``window``, ``softcap``, ``scale``, ``return_lse``,
    ``q_positions``, ``kv_positions``, ``block_q``, ``block_kv``; ``backend``
    and ``interpret`` for ``"pallas"``).
    """
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **options)
    if impl == "pallas":
        # Imported on use so that importing lca never imports Pallas.
        flash_attention = importlib.import_module("kernels_pallas").flash_attention
        return flash_attention(q, k, v, **options)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
