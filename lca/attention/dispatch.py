"""``attention(q, k, v, *, impl=...)``: the one public door to single-device attention.

``impl`` names an entry of :data:`lca.attention.impl.IMPLS` (``"reference"``,
``"xla"``, ``"blockwise"``, ``"pallas"``, ``"cudnn"``) or is a :class:`LocalImpl`. Shapes:
``q [b, q_len, h, d]``, ``k, v [b, kv_len, h_kv, d]`` -> ``out [b, q_len, h, d]``
(and ``lse [b, h, q_len]``). Ring, Ulysses and USP steps resolve ``impl`` in the
same catalogue, so importing lca never imports Pallas.
"""

from __future__ import annotations

from lca.attention.impl import LocalImpl, get_impl


def attention(q, k, v, *, impl: str | LocalImpl = "blockwise", **options):
    """Attention with ``reference_attention`` semantics through ``impl``.

    ``options`` are the keyword arguments of the chosen function (``causal``,
    ``segment_ids``, ``window``, ``softcap``, ``scale``, ``return_lse``,
    ``q_positions``, ``kv_positions``; ``block_q``, ``block_kv`` for
    ``"blockwise"``, ``"pallas"`` and ``"cudnn"``'s Pallas fallback; ``backend`` and ``interpret`` for
    ``"pallas"``; ``"xla"`` has no softcap and no lse).
    """
    local = get_impl(impl)
    if local.attention is None:
        raise ValueError(
            f"impl={local.name!r} is a ring/Ulysses step implementation without a single-device "
            f"function; use impl='blockwise' or impl='pallas' here."
        )
    return local.attention(q, k, v, **options)
