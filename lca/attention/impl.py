"""Local attention implementations that sharded variants run on each device.

Ring, Ulysses and USP attention do not compute attention themselves: each step
calls a *local implementation*, a pair of pure functions with the signatures of
:func:`lca.attention.blockwise_forward` and :func:`lca.attention.blockwise_backward`:

    forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, mask, logit, blocks)
        -> (out [b, q_len, h, d] float32, lse [b, h, q_len] float32)
    backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, *, mask, logit, blocks)
        -> (dq, dk, dv) float32

``blocks`` may be None for the implementation's own defaults. Positions make a
key chunk that sits elsewhere in the global sequence (a ring step) correct.

``attention`` is the implementation's user-facing single-device function
(``reference_attention``'s signature plus its own options such as block sizes),
which :func:`lca.attention.attention` calls; None for step-only implementations.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from lca.attention.blockwise import (
    BlockSizes,
    blockwise_attention,
    blockwise_backward,
    blockwise_forward,
)
from lca.attention.reference import reference_attention
from lca.attention.xla import xla_attention
from lca.parallel.vma import union_varying_axes


@dataclasses.dataclass(frozen=True)
class LocalImpl:
    name: str
    forward: Callable
    backward: Callable
    default_blocks: BlockSizes | None = None
    attention: Callable | None = None
    # Whether its steps type-check under ``jax.shard_map(check_vma=True)``.
    check_vma: bool = True


_REGISTRY: dict[str, LocalImpl] = {}
# Implementations registered on first use, so importing lca never imports Pallas.
_LAZY: dict[str, str] = {"pallas": "kernels_pallas.lca_impl"}


def register_impl(impl: LocalImpl) -> None:
    _REGISTRY[impl.name] = impl


def check_vma_support(name: str, *arrays) -> None:
    """``ValueError`` when ``name`` runs in a ``shard_map`` that checks varying axes and cannot.

    Inside ``jax.shard_map(check_vma=True)`` sharded inputs carry the mesh axes they
    vary over; under ``check_vma=False`` (what the global entry points use for such
    implementations) they carry none.
    """
    if get_impl(name).check_vma:
        return
    axes = sorted(union_varying_axes(*arrays))
    if axes:
        raise ValueError(
            f"impl={name!r} cannot run inside a jax.shard_map that checks varying manual axes "
            f"(the inputs vary over {axes}); pass check_vma=False to your jax.shard_map, use "
            f"the global form (ring_attention, ulysses_attention, usp_attention with mesh=...), "
            f"or impl='blockwise'."
        )


def get_impl(name: str) -> LocalImpl:
    """The local implementation called ``name`` (``"blockwise"``, ``"pallas"``)."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise ValueError(f"impl must be one of {known}, got {name!r}.")
    return _REGISTRY[name]


register_impl(LocalImpl("blockwise", blockwise_forward, blockwise_backward, BlockSizes(),
                        attention=blockwise_attention))
# Interim (house-model) until house-attn's one-dict catalogue lands: single-device-only
# implementations, no ring/Ulysses step functions.
register_impl(LocalImpl("reference", None, None, attention=reference_attention))
register_impl(LocalImpl("xla", None, None, attention=xla_attention))
