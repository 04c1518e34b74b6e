"""Tiling of one attention call: block counts, padded lengths and padding.

Shared by the blockwise loops and the Pallas kernels. Lengths the blocks do not
divide are padded up to whole blocks; padded keys are masked by index and
padded queries are dropped, so any length works.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lca.attention.blocks import BlockSizes


def pad_axis(x, axis: int, size: int, mode: str = "constant"):
    """Pad ``x`` along ``axis`` up to ``size`` (``mode='edge'`` repeats the last value)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block layout of one call: how many blocks of which length on each side."""

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int

    @classmethod
    def of(cls, q_len: int, kv_len: int, blocks: BlockSizes) -> "Tiling":
        """The tiling of ``blocks``' forward sizes (already resolved by the backend)."""
        return cls(q_len, kv_len, blocks.block_q, blocks.block_kv)

    @property
    def num_q(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def q_padded(self) -> int:
        return self.num_q * self.block_q

    @property
    def kv_padded(self) -> int:
        return self.num_kv * self.block_kv

    def pad_q(self, x, axis: int = 1, mode: str = "constant"):
        """``x`` with its query axis padded to whole blocks."""
        return pad_axis(x, axis, self.q_padded, mode)

    def pad_kv(self, x, axis: int = 1, mode: str = "constant"):
        """``x`` with its key axis padded to whole blocks."""
        return pad_axis(x, axis, self.kv_padded, mode)

    def q_position_blocks(self, q_pos):
        """Query positions ``[num_q, block_q]`` int32, edge padded (block ranges stay real)."""
        return self.pad_q(q_pos.astype(jnp.int32), 0, mode="edge").reshape(self.num_q, self.block_q)

    def kv_position_blocks(self, kv_pos):
        """Key positions ``[num_kv, block_kv]`` int32, edge padded (block ranges stay real)."""
        padded = self.pad_kv(kv_pos.astype(jnp.int32), 0, mode="edge")
        return padded.reshape(self.num_kv, self.block_kv)
