"""Kernel block sizes: per-backend defaults and checks of :class:`lca.attention.BlockSizes`.

A kernel tile is ``block_q`` queries by ``block_kv`` keys of one head. Lengths
the blocks do not divide are padded and the padding is masked, so any sequence
length works; blocks longer than the (aligned) sequence are shortened to it.

Backend rules (checked with a ``ValueError`` naming what would work):

* ``gpu_portable``: powers of two >= 16 (Triton tiles), ``head_dim`` a power of
  two in [16, 256] on GPU; interpret mode (CPU) accepts any positive sizes.
* ``mosaic_gpu``: powers of two >= 64 (the forward's wgmma works on 64-row
  warpgroup tiles and 128-byte swizzled SMEM tiles; its backward is the
  portable kernel, which needs powers of two), ``head_dim`` 64, 128 or 256, the forward's SMEM (Q, ``MOSAIC_GPU_STAGES`` K/V tiles, P, out) within
  the H100's 227 KiB, and on GPU bfloat16/float16 inputs (wgmma). The same
  rules hold in interpret mode (it simulates the same TMA tiles), except that
  float32 is accepted there for tight checks.
* ``tpu``: multiples of 128 (the lane width), ``head_dim`` up to 256 (VMEM).
"""

from __future__ import annotations

import numpy as np

from lca.attention.blocks import BlockSizes

BACKENDS = ("gpu_portable", "mosaic_gpu", "tpu")

_DEFAULTS = {"gpu_portable": (64, 64), "mosaic_gpu": (64, 128), "tpu": (512, 512)}
_ALIGN = {"gpu_portable": 16, "mosaic_gpu": 64, "tpu": 128}
_MAX_HEAD_DIM = 256
MOSAIC_GPU_STAGES = 2  # key blocks in flight in the Mosaic GPU forward's TMA pipeline
_MOSAIC_GPU_SMEM = 227 * 1024  # bytes of shared memory per block on sm_90


def default_blocks(backend: str, head_dim: int | None = None) -> BlockSizes:
    """The ``backend``'s sizes for what a caller leaves as None."""
    block_q, block_kv = _DEFAULTS[backend]
    if backend == "mosaic_gpu" and head_dim is not None and head_dim > 128:
        block_kv = 64  # K/V stages must fit in SMEM
    return BlockSizes(block_q, block_kv)


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
    elif backend == "mosaic_gpu":
        if value < align or value & (value - 1):
            raise ValueError(
                f"{name}={value} is not valid for the mosaic_gpu kernel: use a power of two "
                f">= {align} (e.g. 64, 128)."
            )
    elif value % align:
        raise ValueError(
            f"{name}={value} is not valid for the {backend} kernel: use a multiple of {align} "
            f"(e.g. {align}, {2 * align}, {4 * align})."
        )


def check_head_dim(head_dim: int, backend: str, interpret: bool) -> None:
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
    if backend == "mosaic_gpu" and (head_dim < 64 or head_dim & (head_dim - 1)):
        # Multiples of 64 for the forward's swizzled tiles, powers of two for the portable backward.
        raise ValueError(
            f"head_dim={head_dim} is not valid for the mosaic_gpu kernel: use 64, 128 or "
            f"{_MAX_HEAD_DIM}, or backend='gpu_portable'."
        )


def check_dtype(dtype, backend: str, interpret: bool) -> None:
    """wgmma on hardware multiplies 16-bit floats (float32 would need K-major tf32 tiles)."""
    name = np.dtype(dtype).name
    if backend == "mosaic_gpu" and not interpret and name not in ("bfloat16", "float16"):
        raise ValueError(
            f"the mosaic_gpu kernel needs bfloat16 or float16 inputs, got {name}: cast q, k, v "
            f"or use backend='gpu_portable'."
        )


def _check_smem(blocks: BlockSizes, head_dim: int) -> None:
    bq, bk, d = blocks.block_q, blocks.block_kv, head_dim
    # 16-bit Q, K/V stages and P tiles, and the output tile (at most float32).
    needed = 2 * (bq * d + 2 * MOSAIC_GPU_STAGES * bk * d + bq * bk) + 4 * bq * d
    if needed > _MOSAIC_GPU_SMEM:
        raise ValueError(
            f"block_q={bq}, block_kv={bk} with head_dim={d} need {needed // 1024} KiB of shared "
            f"memory in the mosaic_gpu forward (at most {_MOSAIC_GPU_SMEM // 1024} KiB): use "
            f"smaller blocks (e.g. block_q=64, block_kv=64 for head_dim 256)."
        )


def resolve(blocks: BlockSizes | None, q_len: int, kv_len: int, backend: str, interpret: bool,
            head_dim: int | None = None) -> BlockSizes:
    """Validated sizes for one call: defaults filled in, checked, clamped to the lengths.

    Every field is set in the result; the backward's sizes default to the forward's.
    """
    blocks = (blocks or BlockSizes()).or_defaults(default_blocks(backend, head_dim))
    blocks = blocks.or_defaults(BlockSizes(block_q_bwd=blocks.block_q, block_kv_bwd=blocks.block_kv))

    def check_and_clamp(name: str, block: int) -> int:
        _check_block(name, block, backend, interpret)
        length = q_len if name.startswith("block_q") else kv_len
        if backend in ("gpu_portable", "mosaic_gpu"):
            return min(block, max(_ALIGN[backend], _next_pow2(length)))
        return min(block, _round_up(length, _ALIGN[backend]))

    blocks = blocks.map(check_and_clamp)
    if backend == "mosaic_gpu" and head_dim is not None:
        _check_smem(blocks, head_dim)  # the Mosaic GPU kernel is the forward only
    return blocks
