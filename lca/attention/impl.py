"""The catalogue of local attention implementations: one dict, every entry written out here.

A *local implementation* computes attention on one device. Each entry is a
:class:`LocalImpl` with

* ``attention``: its single-device function with ``reference_attention``'s
  signature plus its own options (block sizes, backend), which
  :func:`lca.attention.attention` calls;
* ``forward`` / ``backward``: its *step*, the pair of pure functions ring,
  Ulysses and USP call on each device, with the signatures of
  :func:`lca.attention.blockwise_forward` and :func:`lca.attention.blockwise_backward`::

      forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, mask, logit, blocks)
          -> (out [b, q_len, h, d] float32, lse [b, h, q_len] float32)
      backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, *, mask, logit, blocks)
          -> (dq, dk, dv) float32

  Positions make a key chunk that sits elsewhere in the global sequence (a ring
  step) correct; ``blocks`` may be None for the implementation's own defaults.
  Both are None for implementations that cannot be a step (``reference``,
  ``xla``: dense, no lse-based backward).

Nothing registers itself: :data:`IMPLS` lists every implementation. The Pallas
and cuDNN entries are ``"module:attribute"`` paths imported the first time they
are asked for, so importing lca never imports Pallas or lca's cuDNN module. A
caller with its own implementation passes the :class:`LocalImpl` object wherever
a name is accepted.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from lca.attention.blocks import BlockSizes
from lca.attention.blockwise import blockwise_attention, blockwise_backward, blockwise_forward
from lca.attention.reference import reference_attention
from lca.attention.xla import xla_attention


@dataclasses.dataclass(frozen=True)
class LocalImpl:
    """One local attention implementation (hashable: a static argument of sharded calls)."""

    name: str
    attention: Callable | None  # single-device function; None: step only
    forward: Callable | None = None  # step forward; None: cannot be a ring/Ulysses step
    backward: Callable | None = None
    default_blocks: BlockSizes | None = None
    # Whether its steps type-check under ``jax.shard_map(check_vma=True)``.
    check_vma: bool = True
    # Raises a ValueError (saying what to use instead) where it cannot run on these devices; None: runs anywhere.
    # A launcher calls it once the devices are known, so a run fails before it writes anything.
    require: Callable[[], None] | None = None
    # Its step needs the keys of each call in whole aligned runs of this many consecutive positions (landmark
    # blocks): the ring refuses layouts and chunk lengths that would cut one (see lca.attention.landmark_step).
    key_runs: int = 1

    @property
    def is_step(self) -> bool:
        return self.forward is not None and self.backward is not None


IMPLS: dict[str, LocalImpl | str] = {
    "reference": LocalImpl("reference", reference_attention),
    "xla": LocalImpl("xla", xla_attention),
    "blockwise": LocalImpl("blockwise", blockwise_attention, blockwise_forward,
                           blockwise_backward, BlockSizes()),
    # Fused kernels, imported on first use ("module:attribute").
    "pallas": "kernels_pallas.lca_impl:PALLAS",
    # cuDNN's fused attention (CUDA GPUs), Pallas where its masks cannot express a call.
    "cudnn": "lca.attention.cudnn:CUDNN",
}


def _import(path: str) -> LocalImpl:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def get_impl(impl: str | LocalImpl) -> LocalImpl:
    """The implementation called ``impl`` in :data:`IMPLS` (a :class:`LocalImpl` passes through)."""
    if isinstance(impl, LocalImpl):
        return impl
    entry = IMPLS.get(impl) if isinstance(impl, str) else None
    if entry is None:
        raise ValueError(
            f"impl must be one of {sorted(IMPLS)} or a lca.attention.LocalImpl, got {impl!r}."
        )
    return _import(entry) if isinstance(entry, str) else entry


def get_step(impl: str | LocalImpl) -> LocalImpl:
    """:func:`get_impl` for ring, Ulysses and USP: ``ValueError`` unless it has a step."""
    local = get_impl(impl)
    if not local.is_step:
        steps = [name for name, entry in IMPLS.items()
                 if isinstance(entry, str) or entry.is_step]
        raise ValueError(
            f"impl={local.name!r} computes attention on one device only and has no "
            f"ring/Ulysses step (forward/backward with positions and lse); ring_attention, "
            f"ulysses_attention and usp_attention need one of {steps}."
        )
    return local
