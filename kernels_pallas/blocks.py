"""Kernel block sizes: per-backend defaults and checks of :class:`lca.attention.BlockSizes`.

A kernel tile is ``block_q`` queries by ``block_kv`` keys of one head. Lengths
the blocks do not divide are padded and the padding is masked, so any sequence
length works; blocks longer than the (aligned) sequence are shortened to it.

Backend rules (checked with a ``ValueError`` naming what would work):

* ``gpu_portable``: powers of two >= 16 (Triton tiles), ``head_dim`` a power of
  two in [16, 256] on GPU; interpret mode (CPU) accepts any positive sizes.
* ``mosaic_gpu``: forward blocks powers of two in [64, 256] (the forward's wgmma
  works on 64-row warpgroup tiles and 128-byte swizzled SMEM tiles, and each tile
  is one TMA copy of at most 256 rows); up to ``head_dim`` 128 the backward's
  own blocks (:func:`mosaic_gpu_backward_plan`: powers of two in [64, 256] whose
  warp-specialised dQ and dK/dV kernels fit an SM's SMEM; default 64 x 64), above
  it ``gpu_portable``'s rules (the backward is then the portable kernels);
  ``head_dim`` 64, 128 or 256, the forward's SMEM (:func:`mosaic_gpu_forward_smem`)
  within the H100's 227 KiB, and on GPU bfloat16/float16 inputs (wgmma). The same
  rules hold in interpret mode (it simulates the same TMA tiles), except that
  float32 is accepted there for tight checks.
* ``tpu``: multiples of 128 (the lane width), ``head_dim`` up to 256 (VMEM).

Policy on a known GPU (:func:`plan`, ``device_kind`` from jax or given explicitly):
sizes left as None take the backend's default for the head_dim, dtype and GPU
generation, forward and backward separately, each with its number of warps; the
sizes that are then used (given or default) are checked against an estimate of
shared memory and registers for that device (:func:`estimate`), and sizes that
do not fit are a ``ValueError`` naming the estimate and the largest sizes that
fit, instead of a compile crash ("Shared memory size limit exceeded"). A CUDA GPU
not named in :data:`GPU_LIMITS` is judged by its compute capability. On CPU (or
without either) the generic defaults below apply and nothing is estimated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lca.attention.blocks import BlockSizes

BACKENDS = ("gpu_portable", "mosaic_gpu", "tpu")

_DEFAULTS = {"gpu_portable": (64, 64), "mosaic_gpu": (64, 128), "tpu": (512, 512)}
_ALIGN = {"gpu_portable": 16, "mosaic_gpu": 64, "tpu": 128}
_MAX_HEAD_DIM = 256
MOSAIC_GPU_STAGES = 2  # key blocks in flight in the Mosaic GPU forward's TMA pipeline
MOSAIC_GPU_SMEM = 227 * 1024  # bytes of shared memory per block on sm_90
# Mosaic GPU TMA copies move at most 256 elements along each dimension: the Q tile,
# the K/V tiles and their position/segment rows are one copy each.
TMA_MAX_ELEMS = 256


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """What one thread block may use on a GPU generation (CUDA programming guide, compute capabilities)."""

    generation: str  # hopper (sm_90), ampere (sm_80), ada (sm_89)
    smem_bytes: int  # opt-in shared memory per thread block
    regs_per_thread: int = 255


# Matched on jax's device_kind by longest prefix.
GPU_LIMITS = {
    "NVIDIA H100": GpuLimits("hopper", MOSAIC_GPU_SMEM),
    "NVIDIA H200": GpuLimits("hopper", MOSAIC_GPU_SMEM),
    "NVIDIA H800": GpuLimits("hopper", MOSAIC_GPU_SMEM),
    "NVIDIA GH200": GpuLimits("hopper", MOSAIC_GPU_SMEM),
    "NVIDIA A100": GpuLimits("ampere", 163 * 1024),
    "NVIDIA A800": GpuLimits("ampere", 163 * 1024),
    "NVIDIA L4": GpuLimits("ada", 99 * 1024),
    "NVIDIA L40": GpuLimits("ada", 99 * 1024),
}
# Every other CUDA GPU by compute capability: the opt-in shared memory per thread block in KiB
# (CUDA C++ programming guide, technical specifications per compute capability). A capability
# not listed gets the smallest, so its sizes are checked conservatively rather than not at all.
SMEM_KIB_BY_COMPUTE_CAPABILITY = {
    "7.0": 96, "7.2": 96, "7.5": 64, "8.0": 163, "8.6": 99, "8.7": 163, "8.9": 99, "9.0": 227,
    "10.0": 227, "10.3": 227, "12.0": 99, "12.1": 99,
}
# Registers a thread needs besides the tiles' values (addresses, indices, loop state).
_REG_RESERVE = 32


def gpu_limits(device_kind: str | None, compute_capability: str | None = None) -> GpuLimits | None:
    """The limits of ``device_kind`` (e.g. ``"NVIDIA H100 80GB HBM3"``), else of ``compute_capability``
    (e.g. ``"8.9"``, jax's ``device.compute_capability`` on CUDA); None if neither is known (CPU, TPU)."""
    matches = [kind for kind in GPU_LIMITS if device_kind and device_kind.startswith(kind)]
    if matches:
        return GPU_LIMITS[max(matches, key=len)]
    if compute_capability is None:
        return None
    kib = SMEM_KIB_BY_COMPUTE_CAPABILITY.get(compute_capability, min(SMEM_KIB_BY_COMPUTE_CAPABILITY.values()))
    return GpuLimits(f"sm_{compute_capability.replace('.', '')}", kib * 1024)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved tiles of one call (every ``blocks`` field set) and warps per pass (GPU backends)."""

    blocks: BlockSizes
    warps_fwd: int = 4
    warps_bwd: int = 4


@dataclasses.dataclass(frozen=True)
class PassTiles:
    """One kernel pass's ``(block_q, block_kv)`` and warps per program."""

    block_q: int
    block_kv: int
    warps: int


# The Triton-lowered passes (gpu_portable forward and backward, the mosaic_gpu backward) on
# a known GPU, by the smallest bucket that holds head_dim: (forward, backward). The forward
# follows JAX's Triton example kernel (jax.experimental.pallas.ops.gpu.attention): 128-query
# tiles, 4 warps up to head_dim 64 and 8 above; wider heads take shorter tiles so Q, K and
# the f32 logits and accumulator stay within the register estimate. The backward holds
# two accumulators (dK, dV) and so takes smaller tiles. Every entry fits every GPU in
# GPU_LIMITS by :func:`estimate`; none is tuned on hardware yet.
TRITON_TILES = {
    32: (PassTiles(128, 128, 4), PassTiles(64, 64, 4)),
    64: (PassTiles(128, 64, 4), PassTiles(64, 64, 4)),
    128: (PassTiles(128, 128, 8), PassTiles(64, 64, 8)),
    256: (PassTiles(64, 64, 8), PassTiles(32, 32, 8)),
}


def triton_tiles(head_dim: int | None) -> tuple[PassTiles, PassTiles]:
    """The :data:`TRITON_TILES` entry of ``head_dim`` (None: head_dim 128's)."""
    head_dim = 128 if head_dim is None else head_dim
    return TRITON_TILES[min((d for d in TRITON_TILES if head_dim <= d), default=max(TRITON_TILES))]


def default_plan(backend: str, head_dim: int | None = None, limits: GpuLimits | None = None,
                 itemsize: int = 2) -> Plan:
    """The ``backend``'s sizes for what a caller leaves as None, forward and backward.

    On a known GPU (``limits``) the Triton-lowered passes take :data:`TRITON_TILES`
    for the head_dim, forward and backward each with their own tiles and warps,
    halved where ``itemsize``-byte tiles (float32) would not fit the device; the
    Mosaic GPU forward keeps its (64, 128) warpgroup tiles (64 keys above
    head_dim 128). Without ``limits`` (CPU, interpret mode): the generic sizes,
    the backward's equal to the forward's.
    """
    block_q, block_kv = _DEFAULTS[backend]
    if backend == "mosaic_gpu" and head_dim is not None and head_dim > 128:
        block_kv = 64  # K/V stages must fit in SMEM
    if limits is None or backend == "tpu":
        return Plan(BlockSizes(block_q, block_kv, block_q, block_kv))
    fwd, bwd = triton_tiles(head_dim)
    if head_dim is not None:
        fwd = _shrunk_to_fit(fwd, False, head_dim, itemsize, limits)
        bwd = _shrunk_to_fit(bwd, True, head_dim, itemsize, limits)
    if backend == "gpu_portable":
        return Plan(BlockSizes(fwd.block_q, fwd.block_kv, bwd.block_q, bwd.block_kv), fwd.warps, bwd.warps)
    # mosaic_gpu: the forward's threads are its own (three warpgroups); these backward tiles serve the
    # portable kernels, which run it above MOSAIC_GPU_BWD_MAX_HEAD_DIM (mosaic_gpu_backward_plan below).
    return Plan(BlockSizes(block_q, block_kv, bwd.block_q, bwd.block_kv), 4, bwd.warps)


def _shrunk_to_fit(tiles: PassTiles, backward: bool, head_dim: int, itemsize: int,
                   limits: GpuLimits) -> PassTiles:
    """A portable pass's ``tiles``, the longer side halved until :func:`estimate` fits ``limits``."""
    bq, bk = tiles.block_q, tiles.block_kv
    while (not estimate("gpu_portable", backward, bq, bk, head_dim, itemsize, tiles.warps).fits(limits)
           and max(bq, bk) > _ALIGN["gpu_portable"]):
        bq, bk = (bq, bk // 2) if bk >= bq else (bq // 2, bk)
    return PassTiles(bq, bk, tiles.warps)


# --------------------------------------------------------------------------- estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Shared memory (bytes) and 32-bit registers per thread one kernel pass needs."""

    smem_bytes: int
    regs_per_thread: int

    def fits(self, limits: GpuLimits) -> bool:
        return (self.smem_bytes <= limits.smem_bytes
                and self.regs_per_thread <= limits.regs_per_thread - _REG_RESERVE)


def estimate(backend: str, backward: bool, block_q: int, block_kv: int, head_dim: int, itemsize: int,
             warps: int) -> Estimate:
    """What one program of ``backend``'s forward (or backward) needs for these tiles.

    A model, not the compilers' allocators: tiles that feed a matrix product
    live in shared memory in the input dtype, accumulators and logits in f32
    registers spread over the threads. The portable forward's shared memory is
    the Q and K tiles, which matches the 262144 bytes Triton asked for at
    512 x 512, head_dim 128, bf16 on an H100 (issue 15). The Mosaic GPU forward
    allocates its SMEM explicitly (:func:`mosaic_gpu_forward_smem`).
    """
    bq, bk, d, n = block_q, block_kv, head_dim, itemsize
    threads = 32 * warps

    def regs(f32_values: int, tile_elems: int = 0) -> int:
        return -(-(4 * f32_values + n * tile_elems) // (4 * threads))

    if backward:  # the portable dK/dV pass, the larger of the two (dQ holds one accumulator)
        return Estimate(n * d * (2 * bq + 2 * bk), regs(2 * bk * d + 2 * bq * bk, 2 * bk * d))
    if backend == "mosaic_gpu":  # two consumer warpgroups of block_q rows each
        return Estimate(mosaic_gpu_forward_smem(bq, bk, d, n), regs(bq * d + bq * bk))
    return Estimate(n * d * (bq + bk), regs(bq * d + bq * bk, bq * d))


def mosaic_gpu_forward_smem(block_q: int, block_kv: int, head_dim: int, itemsize: int, width: int = 0,
                            out_itemsize: int = 0) -> int:
    """Bytes of SMEM the Mosaic GPU forward (``kernels_pallas.gpu.hopper``) allocates on hardware.

    Per consumer a Q tile (reused for an output of Q's dtype), its lse row and query
    positions and segments; per stage K and V tiles and key positions and segments;
    ``width`` schedule entries (a list and two code rows, int32: they grow with the key
    length); an output of another dtype (``out_itemsize`` bytes, e.g. a ring step's
    float32) takes one more tile, which the consumers share in turn. P goes from
    registers into the wgmma; only the interpret mode stages it in SMEM.
    """
    bq, bk, d, stages = block_q, block_kv, head_dim, MOSAIC_GPU_STAGES
    tiles = itemsize * (2 * bq * d + 2 * stages * bk * d) + out_itemsize * bq * d
    return tiles + 4 * (2 * bq + 2 * 2 * bq + stages * 2 * bk + 3 * width)


def _pass_backend(backend: str, backward: bool) -> str:
    """The kernel family whose rules a pass follows: the mosaic_gpu backward above
    ``MOSAIC_GPU_BWD_MAX_HEAD_DIM`` is the portable kernels (below it, :func:`plan`
    applies :func:`mosaic_gpu_backward_plan` instead)."""
    return "gpu_portable" if backend == "mosaic_gpu" and backward else backend


def _sizes_that_fit(backend: str, backward: bool, head_dim: int, itemsize: int, warps: int,
                    limits: GpuLimits) -> list[tuple[int, int]]:
    """The largest (block_q, block_kv) powers of two that fit, among tiles at most twice as long as wide."""
    top = TMA_MAX_ELEMS if backend == "mosaic_gpu" and not backward else 1024
    sizes = [1 << e for e in range(4, 11) if _ALIGN[_pass_backend(backend, backward)] <= 1 << e <= top]
    fit = [(bq, bk) for bq in sizes for bk in sizes if bq <= 2 * bk and bk <= 2 * bq
           and estimate(backend, backward, bq, bk, head_dim, itemsize, warps).fits(limits)]
    if not fit:
        return []
    best = max(bq * bk for bq, bk in fit)
    return [(bq, bk) for bq, bk in fit if bq * bk == best]


def check_fits(plan_: Plan, backend: str, head_dim: int, itemsize: int, limits: GpuLimits,
               device_kind: str, backward: bool = True) -> None:
    """A ``ValueError`` if a pass's tiles do not fit ``device_kind`` (estimate and what fits).

    ``backward=False`` leaves the backward to its own check (the Mosaic GPU backward's).
    """
    passes = [("forward", False, plan_.blocks.block_q, plan_.blocks.block_kv, plan_.warps_fwd)]
    if backward:
        passes.append(("backward", True, plan_.blocks.block_q_bwd, plan_.blocks.block_kv_bwd, plan_.warps_bwd))
    for name, backward, bq, bk, warps in passes:
        need = estimate(backend, backward, bq, bk, head_dim, itemsize, warps)
        if need.fits(limits):
            continue
        suffix = "_bwd" if backward else ""
        fit = " or ".join(f"block_q{suffix}={q}, block_kv{suffix}={k}"
                          for q, k in _sizes_that_fit(backend, backward, head_dim, itemsize, warps, limits))
        raise ValueError(
            f"block_q{suffix}={bq}, block_kv{suffix}={bk} do not fit the {backend} {name} on {device_kind} "
            f"with head_dim={head_dim}, {8 * itemsize}-bit inputs and {warps} warps: an estimated "
            f"{need.smem_bytes} bytes of shared memory ({limits.smem_bytes} available) and "
            f"{need.regs_per_thread} registers per thread ({limits.regs_per_thread - _REG_RESERVE} available "
            f"for tiles). The largest sizes that fit: {fit or 'none'}; or leave the sizes unset (None) "
            f"for the backend's default."
        )


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
        if value > TMA_MAX_ELEMS:
            raise ValueError(
                f"{name}={value} is too large for the mosaic_gpu forward: its TMA copies move at most "
                f"{TMA_MAX_ELEMS} elements per dimension; use {name} <= {TMA_MAX_ELEMS} "
                f"(e.g. 64 or 128)."
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
    """The Mosaic GPU forward's explicit SMEM (16-bit tiles) within any Hopper's, device known or not."""
    bq, bk, d = blocks.block_q, blocks.block_kv, head_dim
    needed = estimate("mosaic_gpu", False, bq, bk, d, 2, 4).smem_bytes
    if needed > MOSAIC_GPU_SMEM:
        raise ValueError(
            f"block_q={bq}, block_kv={bk} with head_dim={d} need {needed // 1024} KiB of shared "
            f"memory in the mosaic_gpu forward (at most {MOSAIC_GPU_SMEM // 1024} KiB): use "
            f"smaller blocks (e.g. block_q=64, block_kv=64 for head_dim 256)."
        )


def plan(blocks: BlockSizes | None, q_len: int, kv_len: int, backend: str, interpret: bool,
         head_dim: int | None = None, *, dtype=None, device_kind: str | None = None,
         compute_capability: str | None = None) -> Plan:
    """The tiles and warps of one call: the policy's defaults for what is None, checked and clamped.

    ``device_kind`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or for a GPU not in
    :data:`GPU_LIMITS` its ``compute_capability``, selects the GPU limits; with a
    known GPU the defaults are that generation's and every size is checked against
    the estimate of :func:`estimate` (``dtype`` sets the tiles' bytes, default 2).
    """
    limits = gpu_limits(device_kind, compute_capability) if backend != "tpu" else None
    if not device_kind and compute_capability:
        device_kind = f"a GPU of compute capability {compute_capability}"  # for the error messages
    itemsize = 2 if dtype is None else np.dtype(dtype).itemsize
    # The mosaic_gpu backward up to MOSAIC_GPU_BWD_MAX_HEAD_DIM is Mosaic GPU kernels with rules of
    # their own (mosaic_gpu_backward_plan); the portable ones (and their rules) only above it.
    hopper_bwd = backend == "mosaic_gpu" and head_dim is not None and head_dim <= MOSAIC_GPU_BWD_MAX_HEAD_DIM
    default = default_plan(backend, head_dim, limits, itemsize)
    forward = (blocks or BlockSizes()).or_defaults(BlockSizes(default.blocks.block_q, default.blocks.block_kv))
    # A known GPU's backward has its own tiles; otherwise it tiles like the forward.
    bwd = (default.blocks if limits is not None else forward).backward
    resolved = forward.or_defaults(BlockSizes(block_q_bwd=bwd.block_q, block_kv_bwd=bwd.block_kv))

    def check_and_clamp(name: str, block: int) -> int:
        if hopper_bwd and name.endswith("_bwd"):
            return block  # checked by mosaic_gpu_backward_plan
        kernel = _pass_backend(backend, name.endswith("_bwd"))
        _check_block(name, block, kernel, interpret)
        length = q_len if name.startswith("block_q") else kv_len
        if kernel in ("gpu_portable", "mosaic_gpu"):
            return min(block, max(_ALIGN[kernel], _next_pow2(length)))
        return min(block, _round_up(length, _ALIGN[kernel]))

    result = dataclasses.replace(default, blocks=resolved.map(check_and_clamp))
    if backend == "mosaic_gpu" and head_dim is not None:
        _check_smem(result.blocks, head_dim)  # the Mosaic GPU forward, device known or not
    if hopper_bwd:
        result = mosaic_gpu_backward_plan(result, blocks, head_dim)
    if limits is not None and head_dim is not None:
        check_fits(result, backend, head_dim, itemsize, limits, device_kind, backward=not hopper_bwd)
    return result


# --------------------------------------------------------------------------- Mosaic GPU backward

# The Mosaic GPU dQ and dK/dV kernels (kernels_pallas.gpu.hopper_bwd) up to this head_dim;
# above it the mosaic_gpu backward runs the portable kernels and their rules.
MOSAIC_GPU_BWD_MAX_HEAD_DIM = 128
MOSAIC_GPU_BWD_DEFAULT = (64, 64)


def mosaic_gpu_backward_smem(block_q: int, block_kv: int, head_dim: int, itemsize: int, width: int = 0) -> int:
    """Bytes of SMEM on hardware of the larger Mosaic GPU backward kernel (dK/dV, or dQ) for these tiles.

    Both kernels are warp-specialised with two consumers (``kernels_pallas.gpu.hopper_bwd``).
    dQ: per consumer Q, dO, lse, delta, query positions and segments; per stage K, V,
    key positions and segments; one float32 output tile. dK/dV is the same with the
    roles of query and key blocks swapped. ``width``: the schedule rows' entries
    (a list and two code rows, int32), which grow with the streamed side's length.
    """
    def kernel(own, streamed):
        return (itemsize * (2 * 2 * own * head_dim + MOSAIC_GPU_STAGES * 2 * streamed * head_dim)
                + 4 * own * head_dim + 4 * (2 * 4 * own + MOSAIC_GPU_STAGES * 4 * streamed) + 4 * 3 * width)

    return max(kernel(block_q, block_kv), kernel(block_kv, block_q))


def mosaic_gpu_backward_plan(plan_: Plan, given: BlockSizes | None, head_dim: int) -> Plan:
    """``plan_`` with the Mosaic GPU backward's own tiles: its default where ``given`` leaves them None.

    The backward's tiles must be powers of two in [64, 256] (wgmma warpgroup rows,
    128-byte swizzled tiles, one TMA copy each) and fit the SMEM of an sm_90 block;
    otherwise a ``ValueError`` names the estimate and sizes that fit. Above
    ``MOSAIC_GPU_BWD_MAX_HEAD_DIM`` the portable backward runs and ``plan_`` stands.
    """
    if head_dim > MOSAIC_GPU_BWD_MAX_HEAD_DIM:
        return plan_
    given = given or BlockSizes()
    bq = given.block_q_bwd or MOSAIC_GPU_BWD_DEFAULT[0]
    bk = given.block_kv_bwd or MOSAIC_GPU_BWD_DEFAULT[1]
    for name, value in (("block_q_bwd", bq), ("block_kv_bwd", bk)):
        if value < 64 or value > TMA_MAX_ELEMS or value & (value - 1):
            raise ValueError(
                f"{name}={value} is not valid for the mosaic_gpu backward: use a power of two in "
                f"[64, {TMA_MAX_ELEMS}] (e.g. 64), or leave it unset."
            )
    need = mosaic_gpu_backward_smem(bq, bk, head_dim, 2)
    if need > MOSAIC_GPU_SMEM:
        fit = [(q, k) for q in (64, 128, 256) for k in (64, 128, 256)
               if mosaic_gpu_backward_smem(q, k, head_dim, 2) <= MOSAIC_GPU_SMEM]
        raise ValueError(
            f"block_q_bwd={bq}, block_kv_bwd={bk} need an estimated {need} bytes of shared memory in the "
            f"mosaic_gpu backward with head_dim={head_dim} ({MOSAIC_GPU_SMEM} available); sizes that fit: "
            f"{', '.join(f'({q}, {k})' for q, k in fit) or 'none'}."
        )
    blocks = plan_.blocks
    blocks = BlockSizes(blocks.block_q, blocks.block_kv, bq, bk)
    return dataclasses.replace(plan_, blocks=blocks)
