"""Kernel block sizes: one small frozen dataclass, per-backend defaults and checks.

A kernel tile is ``block_q`` queries by ``block_kv`` keys of one head. Lengths
the blocks do not divide are padded and the padding is masked, so any sequence
length works; blocks longer than the (aligned) sequence are shortened to it.

Backend rules (checked with a ``ValueError`` naming what would work):

* ``gpu_portable``: powers of two >= 16 (Triton tiles), ``head_dim`` a power of
  two in [16, 256] on GPU; interpret mode (CPU) accepts any positive sizes.
* ``mosaic_gpu``: currently the portable kernels (see ``gpu/hopper.py``), so
  the ``gpu_portable`` rules.
* ``tpu``: multiples of 128 (the lane width), ``head_dim`` up to 256 (VMEM).
"""

from __future__ import annotations

import dataclasses

BACKENDS = ("gpu_portable", "mosaic_gpu", "tpu")

_DEFAULTS = {"gpu_portable": (64, 64), "tpu": (512, 512)}
_ALIGN = {"gpu_portable": 16, "tpu": 128}
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """``block_q`` queries by ``block_kv`` keys per kernel tile."""

    block_q: int
    block_kv: int

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")

    @classmethod
    def default(cls, backend: str) -> "FlashBlockSizes":
        return cls(*_DEFAULTS[_rules(backend)])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_block(name: str, value: int, backend: str, interpret: bool) -> None:
    align = _ALIGN[backend]
    if backend == "gpu_portable":
        if interpret:
            return
        if value < align or value & (value - 1):
            raise ValueError(
                f"{name}={value} is not valid for the gpu_portable kernel: use a power of two "
                f">= {align} (e.g. 32, 64, 128)."
            )
    elif value % align:
        raise ValueError(
            f"{name}={value} is not valid for the {backend} kernel: use a multiple of {align} "
            f"(e.g. {align}, {2 * align}, {4 * align})."
        )


def check_head_dim(head_dim: int, backend: str, interpret: bool) -> None:
    backend = _rules(backend)
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim={head_dim} is too large for the {backend} kernel (tiles must fit in "
            f"on-chip memory): use head_dim <= {_MAX_HEAD_DIM}, or lca.attention.blockwise_attention."
        )
    if backend == "gpu_portable" and not interpret and (
        head_dim < 16 or head_dim & (head_dim - 1)
    ):
        raise ValueError(
            f"head_dim={head_dim} is not valid for the gpu_portable kernel on GPU: use a power "
            f"of two in [16, {_MAX_HEAD_DIM}] (e.g. 64, 128)."
        )


def _rules(backend: str) -> str:
    # mosaic_gpu runs the portable kernels for now (kernels_pallas/gpu/hopper.py).
    return "gpu_portable" if backend == "mosaic_gpu" else backend


def resolve(block_q, block_kv, q_len: int, kv_len: int, backend: str, interpret: bool):
    """Validated ``FlashBlockSizes`` for one call: defaults filled in, clamped to the lengths."""
    backend = _rules(backend)
    default = FlashBlockSizes.default(backend)
    blocks = FlashBlockSizes(
        default.block_q if block_q is None else block_q,
        default.block_kv if block_kv is None else block_kv,
    )
    _check_block("block_q", blocks.block_q, backend, interpret)
    _check_block("block_kv", blocks.block_kv, backend, interpret)

    def clamp(block: int, length: int) -> int:
        if backend == "gpu_portable":
            return min(block, max(_ALIGN[backend], _next_pow2(length)))
        return min(block, _round_up(length, _ALIGN[backend]))

    return FlashBlockSizes(clamp(blocks.block_q, q_len), clamp(blocks.block_kv, kv_len))
