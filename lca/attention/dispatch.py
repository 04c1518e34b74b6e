"""``attention(q, k, v, *, impl=...)``: single-device attention by implementation name.

``impl="blockwise"`` runs :func:`lca.attention.blockwise_attention` (pure JAX,
O(n) memory); ``impl="pallas"`` runs ``kernels_pallas.flash_attention`` (fused
kernels; interpreted on CPU). Shapes: ``q [b, q_len, h, d]``,
``k, v [b, kv_len, h_kv, d]`` -> ``out [b, q_len, h, d]`` (and ``lse [b, h, q_len]``).
Names resolve through the one registry of :mod:`lca.attention.impl`, the same
that ring, Ulysses and USP steps use, so importing lca never imports Pallas.
"""

from __future__ import annotations

from lca.attention.impl import get_impl


def attention(q, k, v, *, impl: str = "blockwise", **options):
    """Attention with ``reference_attention`` semantics through ``impl``.

    ``options`` are the keyword arguments of the chosen function (``causal``,
    ``segment_ids``, ``window``, ``softcap``, ``scale``, ``return_lse``,
    ``q_positions``, ``kv_positions``, ``block_q``, ``block_kv``; ``backend``
    and ``interpret`` for ``"pallas"``).
    """
    local = get_impl(impl)
    if local.attention is None:
        raise ValueError(
            f"impl={impl!r} is a ring/Ulysses step implementation without a single-device "
            f"function; use impl='blockwise' or impl='pallas' here."
        )
    return local.attention(q, k, v, **options)
