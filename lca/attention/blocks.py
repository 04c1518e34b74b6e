"""Block sizes: the one tile-size type of every backend (blockwise loops, Pallas kernels, ring steps).

A tile is ``block_q`` queries by ``block_kv`` keys. ``None`` leaves a size to
the backend, which fills in its own default (blockwise: 512; the kernels: see
``kernels_pallas.blocks``). The backward may tile differently from the forward
(``block_q_bwd``/``block_kv_bwd``; None: the forward's sizes). Each backend
then applies its own rules (alignment, clamping to the sequence lengths).
"""

from __future__ import annotations

import dataclasses
import inspect

from lca.attention.static import positive_int

_FIELDS = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tile lengths of one call, forward and backward; None: the backend's choice.

    Hashable and static (a ``custom_vjp`` non-differentiable argument). Sizes are
    validated once, here: positive integers (NumPy integers are accepted and
    stored as ``int``).
    """

    block_q: int | None = None
    block_kv: int | None = None
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    def __post_init__(self):
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, positive_int(name, value))

    @classmethod
    def of(cls, source) -> "BlockSizes":
        """The four sizes read off ``source`` by name (e.g. a config's ``model.attention``)."""
        return cls(*(getattr(source, name) for name in _FIELDS))

    def as_options(self, impl) -> dict:
        """Keyword arguments for ``impl``'s single-device function (a :class:`lca.attention.impl.LocalImpl`):
        the four sizes where it takes tiles (blockwise, pallas, cudnn; each reads None as its own
        default), nothing where it does not (reference, xla)."""
        takes_tiles = "block_q" in inspect.signature(impl.attention).parameters
        return dataclasses.asdict(self) if takes_tiles else {}

    def or_defaults(self, default: "BlockSizes") -> "BlockSizes":
        """These sizes with every None taken from ``default``."""
        return BlockSizes(*(
            getattr(default, name) if getattr(self, name) is None else getattr(self, name)
            for name in _FIELDS
        ))

    @property
    def backward(self) -> "BlockSizes":
        """The backward's tiles as forward sizes: ``*_bwd`` where given, else the forward's."""
        return BlockSizes(
            self.block_q if self.block_q_bwd is None else self.block_q_bwd,
            self.block_kv if self.block_kv_bwd is None else self.block_kv_bwd,
        )

    def map(self, fn) -> "BlockSizes":
        """``fn(name, size)`` applied to every size that is set (backend checks, clamping)."""
        return BlockSizes(*(
            None if getattr(self, name) is None else fn(name, getattr(self, name))
            for name in _FIELDS
        ))
