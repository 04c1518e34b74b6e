"""``flash_attention``: lca's fused attention kernels behind one differentiable call.

Shapes follow lca: ``q [b, q_len, h, d]``, ``k, v [b, kv_len, h_kv, d]``,
``lse [b, h, q_len]`` float32. Semantics are exactly those of
:func:`lca.attention.reference_attention` (validation is shared through
``lca.attention.inputs``).

Backends (``backend=``):

* ``"gpu_portable"``: generic ``pl.pallas_call`` kernels (Triton on GPU);
  forward, dQ and dK/dV. On CPU it runs with ``interpret=True``.
* ``"mosaic_gpu"``: Hopper (sm_90, H100/H200), explicit opt-in only. The
  forward is a warp-specialised, ping-pong Mosaic GPU kernel
  (``kernels_pallas.gpu.hopper``); the backward is Mosaic GPU dQ and dK/dV
  kernels with their own blocks (``kernels_pallas.gpu.hopper_bwd``; the
  portable kernels for head_dim 256). Validated on CPU under the Mosaic GPU
  interpret mode and by lowering for CUDA on CPU. On an H100 (2026-11-27) the
  kernels of that day matched the oracle at real sizes (one ring-position test
  asked for blocks the kernel refuses by design), and ran slower than the portable ones; the compiled path has
  changed since (register operands, ``approx_math``) and has not run there again.
* ``"tpu"``: Mosaic TPU kernels with VMEM scratch (forward, dQ, dK/dV). On CPU
  they run under the TPU interpret mode (``pltpu.InterpretParams``).

``backend="auto"`` picks ``"tpu"`` on TPU and ``"gpu_portable"`` on every GPU
(Hopper included) and on CPU: it never selects ``"mosaic_gpu"`` (flip
:func:`default_backend` once ``tests/kernels/test_gpu.py`` passes on an H100/H200
and ``benchmarks/kernels.py`` shows it faster). On CPU every backend is
interpreted (``interpret`` is forced on).

The two pure functions :func:`kernel_forward` / :func:`kernel_backward` have
the signatures of ``lca.attention.blockwise_forward`` / ``blockwise_backward``
(explicit positions, float32 results, backward from the *final* out/lse), so
ring attention can use them per step. A NaN or inf in a key or value reaches
only the queries that see it (see ``lca.attention.nonfinite``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas import blocks as blocks_lib
from kernels_pallas import tiles
from kernels_pallas.gpu import portable
from lca.attention import inputs, nonfinite
from lca.attention.blocks import BlockSizes
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.attention.tiling import Tiling
from lca.attention.vjp import attention_vjp


def default_backend(device=None) -> str:
    """The backend ``"auto"`` picks for ``device`` (default: the first JAX device).

    Hopper gets ``"gpu_portable"`` too: the ``"mosaic_gpu"`` kernels are only
    validated in interpret mode and by lowering on CPU, so they stay an explicit
    opt-in until ``tests/kernels/test_gpu.py`` (which runs their forward and
    backward) passes on an H100/H200; then return ``"mosaic_gpu"`` for sm_90 here.
    """
    device = device or jax.devices()[0]
    return "tpu" if device.platform == "tpu" else "gpu_portable"


def _on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one kernel call (hashable: a ``custom_vjp`` nondiff arg)."""

    mask: Mask
    logit: LogitOptions
    blocks: BlockSizes  # every field resolved (``blocks_lib.plan``)
    backend: str
    interpret: bool
    warps_fwd: int = 4  # GPU backends' warps per program, forward and backward (blocks_lib.plan)
    warps_bwd: int = 4


def _backend_module(backend: str, backward: bool = False):
    """The module whose ``forward`` (or ``backward``) runs ``backend``'s pass."""
    if backend == "tpu":
        from kernels_pallas.tpu import flash

        return flash
    if backend == "mosaic_gpu":
        from kernels_pallas.gpu import hopper, hopper_bwd

        return hopper_bwd if backward else hopper
    return portable


def _warps(cfg: KernelConfig, backward: bool) -> dict:
    """``num_warps`` for the Triton-lowered passes: the portable kernels, and the mosaic_gpu backward's
    portable fallback (head_dim 256); Mosaic kernels set their own threads."""
    if cfg.backend == "tpu" or (cfg.backend == "mosaic_gpu" and not backward):
        return {}
    return {"num_warps": cfg.warps_bwd if backward else cfg.warps_fwd}


def _prepare(q_pos, kv_pos, q_seg, kv_seg, q_len, kv_len, blocks: BlockSizes, mask: Mask):
    tiling = Tiling.of(q_len, kv_len, blocks)
    plan = tiles.plan(q_pos, kv_pos, tiling, mask)
    q_seg, kv_seg = tiles.pad_segments(q_seg, kv_seg, tiling)
    return tiling, plan, q_seg, kv_seg


def kernel_forward(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, cfg: KernelConfig,
                   out_dtype=jnp.float32):
    """Attention with explicit positions through the ``cfg.backend`` kernel.

    Args:
      q ``[b, q_len, h, d]``; k, v ``[b, kv_len, h_kv, d]``; q_pos ``[q_len]``,
      kv_pos ``[kv_len]`` int32; q_seg ``[b, q_len]``, kv_seg ``[b, kv_len]`` or None.

    Returns:
      ``out [b, q_len, h, d]`` in ``out_dtype`` and ``lse [b, h, q_len]`` float32.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    tiling, plan, q_seg, kv_seg = _prepare(q_pos, kv_pos, q_seg, kv_seg, q_len, kv_len,
                                           cfg.blocks, cfg.mask)
    # Non-finite keys reach only the rows that see them (see lca.attention.nonfinite).
    k, v = nonfinite.forward_operands(k, v)
    out, lse = _backend_module(cfg.backend).forward(
        tiling.pad_q(q), tiling.pad_kv(k), tiling.pad_kv(v), plan, q_seg, kv_seg,
        tiling=tiling, mask=cfg.mask, logit=cfg.logit, out_dtype=out_dtype,
        interpret=cfg.interpret, **_warps(cfg, backward=False),
    )
    return out[:, :q_len], lse[..., :q_len]


def kernel_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None, *,
                    cfg: KernelConfig):
    """Gradients of ``(out, lse)`` w.r.t. ``q, k, v`` (float32), from the final ``out``/``lse``.

    ``out, dout [b, q_len, h, d]``; ``lse, dlse [b, h, q_len]`` (dlse may be None).
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    tiling, plan, q_seg, kv_seg = _prepare(q_pos, kv_pos, q_seg, kv_seg, q_len, kv_len,
                                           cfg.blocks.backward, cfg.mask)
    # FlashAttention-2: ds = p * (dp - delta) with delta = rowsum(dout * out); an lse
    # cotangent adds p * dlse to ds, i.e. subtracts dlse from delta.
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # empty rows: every logit is -inf anyway
    dout = dout.astype(q.dtype)
    k, v = nonfinite.backward_operands(k, v)
    dq, dk, dv = _backend_module(cfg.backend, backward=True).backward(
        tiling.pad_q(q), tiling.pad_kv(k), tiling.pad_kv(v), tiling.pad_q(dout),
        tiling.pad_q(lse, 2), tiling.pad_q(delta, 2), plan, q_seg, kv_seg,
        tiling=tiling, mask=cfg.mask, logit=cfg.logit, interpret=cfg.interpret,
        **_warps(cfg, backward=True),
    )
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


def _flash_forward(cfg: KernelConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return kernel_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg=cfg, out_dtype=q.dtype)


def _flash_backward(cfg: KernelConfig, *args):
    return kernel_backward(*args, cfg=cfg)


# ``(out in q.dtype, lse f32)``, differentiable by the kernels' backward.
_flash = attention_vjp(_flash_forward, _flash_backward)


def resolve_config(head_dim: int, q_len: int, kv_len: int, *, mask: Mask, logit: LogitOptions,
                   blocks: BlockSizes | None = None, backend: str = "auto",
                   interpret: bool = False, dtype=None, device_kind: str | None = None) -> KernelConfig:
    """Validate the backend, interpret flag, input dtype and block sizes of one call.

    ``device_kind`` (default: the GPU's, when running on one) selects the block
    policy's defaults and limits (``kernels_pallas.blocks.plan``); pass it to
    check sizes for a GPU from a CPU.
    """
    if backend == "auto":
        backend = default_backend()
    if backend not in blocks_lib.BACKENDS:
        raise ValueError(
            f"backend must be 'auto' or one of {blocks_lib.BACKENDS}, got {backend!r}."
        )
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}.")
    compute_capability = None
    if device_kind is None and jax.devices()[0].platform == "gpu":
        device = jax.devices()[0]
        # A GPU missing from blocks.GPU_LIMITS is judged by its capability (CUDA only; ROCm has none).
        device_kind, compute_capability = device.device_kind, getattr(device, "compute_capability", None)
    interpret = interpret or _on_cpu()  # kernels cannot be compiled for the CPU
    blocks_lib.check_head_dim(head_dim, backend, interpret)
    if dtype is not None:
        blocks_lib.check_dtype(dtype, backend, interpret)
    plan = blocks_lib.plan(blocks, q_len, kv_len, backend, interpret, head_dim, dtype=dtype,
                           device_kind=device_kind, compute_capability=compute_capability)
    return KernelConfig(mask, logit, plan.blocks, backend, interpret, plan.warps_fwd, plan.warps_bwd)


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    block_q_bwd: int | None = None,
    block_kv_bwd: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    interpret: bool = False,
    q_positions=None,
    kv_positions=None,
):
    """Fused flash attention with the exact semantics of ``reference_attention``.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``; GQA/MQA through the
        kernels' index maps (K/V are never repeated).
      causal, segment_ids, window, softcap, scale, q_positions, kv_positions:
        as in ``reference_attention``. Positions (e.g. a key offset) place a
        chunk anywhere in a global sequence.
      block_q, block_kv: tile sizes (None: the backend default, see
        ``kernels_pallas.blocks``); any lengths work (padding is masked).
      block_q_bwd, block_kv_bwd: the backward's tiles (None: the backend's
        default for it, which on a known GPU is its own, not the forward's).
      return_lse: also return ``lse [batch, num_heads, q_len]`` float32
        (differentiable).
      backend: ``"auto"``, ``"gpu_portable"``, ``"mosaic_gpu"`` or ``"tpu"``.
      interpret: run in Pallas interpret mode (always on for CPU).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype (and ``lse``).
    """
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    cfg = resolve_config(
        d, q_len, kv_len,
        mask=inputs.make_mask(causal, window),
        logit=inputs.logit_options(d, scale, softcap),
        blocks=BlockSizes(block_q, block_kv, block_q_bwd, block_kv_bwd), backend=backend, interpret=interpret,
        dtype=q.dtype,
    )
    q_seg, kv_seg = segs if segs is not None else (None, None)
    out, lse = _flash(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out
