"""Attention kernels a model layer can use, by name.

Every entry builds a callable with lca's signature

    fn(q, k, v, *, causal, segment_ids, window, softcap, scale) -> out

``q [b, l, h, d]``, ``k, v [b, l, h_kv, d]``, global (natural-order) arrays.
Sharded kinds (ring, ulysses, usp) get the mesh when they are built. Kinds
that live in other modules are imported on first use, so a model config can name
any kind and only the one it uses has to be installed.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from lca.attention import blockwise_attention, reference_attention, xla_attention

# Kinds whose callable comes from another module: name -> (module, attribute).
_LAZY = {
    "ring": ("lca.attention", "ring_attention"),
    "ulysses": ("lca.attention", "ulysses_attention"),
    "usp": ("lca.attention", "usp_attention"),
    "pallas": ("kernels_pallas", "flash_attention"),
}
KINDS = ("reference", "xla", "blockwise", "ring", "ulysses", "usp", "pallas")
CONTEXT_PARALLEL = ("ring", "ulysses", "usp")


def _load(kind: str) -> Callable:
    module, attr = _LAZY[kind]
    return getattr(importlib.import_module(module), attr)


def is_available(kind: str) -> bool:
    """Whether ``kind`` can be built here (its module imports)."""
    if kind not in KINDS:
        return False
    if kind not in _LAZY:
        return True
    try:
        _load(kind)
    except (ImportError, AttributeError):
        return False
    return True


def available_kinds() -> list[str]:
    return [kind for kind in KINDS if is_available(kind)]


def resolve_kind(kind: str, context_size: int) -> str:
    """``"auto"`` -> ring when the context axis is split (blockwise without ring), else blockwise."""
    if kind != "auto":
        return kind
    if context_size > 1 and is_available("ring"):
        return "ring"
    return "blockwise"


def make_attention(
    kind: str,
    *,
    mesh=None,
    block_q: int = 512,
    block_kv: int = 512,
    layout: str = "zigzag",
    impl: str = "blockwise",
    context_axis: str = "context",
    ulysses_axis: str = "tensor",
    ring_axis: str = "context",
) -> Callable:
    """The attention callable called ``kind`` with its options bound.

    >>> attn = make_attention("blockwise", block_q=128, block_kv=128)
    >>> out = attn(q, k, v, causal=True, segment_ids=None, window=None, softcap=None, scale=None)
    """
    if kind not in KINDS:
        raise ValueError(f"attention kind must be one of {list(KINDS)} or 'auto', got {kind!r}.")
    if kind == "reference":
        return reference_attention
    if kind == "xla":
        return xla_attention
    if kind == "blockwise":
        return functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)
    try:
        fn = _load(kind)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"attention kind {kind!r} is not available here ({err}); available: {available_kinds()}."
        ) from None
    if kind == "pallas":
        return functools.partial(fn, block_q=block_q, block_kv=block_kv)
    if mesh is None:
        raise ValueError(f"attention kind {kind!r} shards over a mesh; pass mesh=.")
    if kind == "usp":
        return functools.partial(
            fn, mesh=mesh, ulysses_axis=ulysses_axis, ring_axis=ring_axis, impl=impl, layout=layout,
            block_q=block_q, block_kv=block_kv,
        )
    options = dict(mesh=mesh, axis=context_axis, impl=impl, block_q=block_q, block_kv=block_kv)
    if kind == "ring":
        options["layout"] = layout
    return functools.partial(fn, **options)
