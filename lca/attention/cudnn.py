"""cuDNN's fused attention, the one JAX ships, as lca's ``"cudnn"`` local implementation.

``get_impl("cudnn")`` returns :data:`CUDNN`, imported on first use from the
catalogue's path ``"lca.attention.cudnn:CUDNN"``: importing lca never imports
this module. It is a step like ``"pallas"`` (ring, Ulysses and USP run it on
every device) and a single-device function (:func:`cudnn_attention`, reached
through ``lca.attention.attention(..., impl="cudnn")``).

It binds the two primitives behind ``jax.nn.dot_product_attention(implementation=
"cudnn")`` (``jax._src.cudnn.fused_attention_stablehlo``: private, the same in jax
0.10.2 and 0.11): the forward in training mode returns the output and cuDNN's
float32 softmax statistics, the natural-log log-sum-exp of the scaled logits,
which is lca's ``lse [b, h, q_len]``; the backward recomputes the probabilities
from q, k, v, an output and those statistics. lca's own custom VJP
(:mod:`lca.attention.vjp`) ties the pair, so a ring step's backward gets the
*global* output and lse, as every step does, and cuDNN's ``p = exp(s - lse)`` is
then the global probability.

When cuDNN runs, and when the ``"pallas"`` implementation does instead
-----------------------------------------------------------------------
cuDNN's masks are index-based (none; causal aligned top-left, query ``i`` sees
keys ``j <= i``; with causal, a left window ``(i - W, i]``), lca's are
position-based (:mod:`lca.attention.mask`). A call goes to Pallas:

1. statically, at trace time, for the whole call when :func:`fallback_reason`
   gives a reason:

   * dtype other than bfloat16 / float16 (cuDNN's flash attention takes no float32);
   * head_dim not a multiple of 8, or above cuDNN's limit (128; 256 on sm_90+);
   * ``softcap`` (cuDNN has no tanh cap);
   * segment ids, except in a plain self-attention call (see 4.: packed documents);
     cuDNN's packed masks take per-row lengths and offsets of contiguous documents,
     while lca's ids are arbitrary per token and cross chunk boundaries in a ring;
   * ``window`` without ``causal`` (cuDNN has only the left window);
   * in the backward, an lse cotangent when the fold below does not fit the head-dim limit.

2. by the positions (:func:`position_case`): statically for a plain call
   (default positions), at run time with ``lax.switch`` when positions are
   explicit (ring/Ulysses/USP steps, ``q_positions=``):

   * every query sees every key (no mask, or a causal ring step whose key chunk
     lies entirely in the past): cuDNN without mask;
   * causal, both position runs contiguous and starting at the same position
     (self-attention; the diagonal chunks of a zigzag ring): cuDNN causal, with
     the window as cuDNN's sliding window;
   * causal without a window, the same strictly increasing positions on both
     sides (a zigzag shard's first ring step, one call over both chunks): cuDNN
     causal, index order being position order;
   * anything else: Pallas. That includes causal with ``q_len != kv_len`` in a
     plain call: lca aligns bottom-right, cuDNN top-left.

   Zigzag ring steps are thus all cuDNN calls.

3. The lse cotangent. cuDNN's backward takes none: it forms ``ds = p * (dp -
   delta)`` with ``delta = rowsum(dout * out)`` itself. An lse cotangent adds
   ``p * dlse`` to ``ds``; :func:`fold_lse_cotangent` folds it in exactly by one
   more head-dim column (padded to 8). When the lse is not differentiated (the
   usual case, ring steps included) the backward gets ``dlse=None`` (symbolic
   zeros, :mod:`lca.attention.vjp`) and runs cuDNN's plain backward.

4. Packed documents. A plain call (default positions, ``q_len == kv_len``, no lse
   returned) with segment ids, causal or without mask, no window, on sm_90 or later,
   runs cuDNN's packed layout: each row's maximal runs of equal ids are its documents
   (:func:`segment_runs`), given to cuDNN as lengths and offsets, and cuDNN attends
   within them. That is lca's rule (equal ids see each other) exactly when no id
   comes back in a later run of its row and a row has at most
   :data:`PACKED_MAX_RUNS` runs; ``lax.cond`` sends other batches to Pallas at run
   time. Rows packed by :mod:`lca.data.pipeline` (ids 1, 2, ..., then padding 0)
   qualify. cuDNN's softmax statistics of this layout never leave the call (its own
   backward reads them), which is why no lse is returned. GQA/MQA keys and values are
   repeated to the query's heads for this call (:func:`_as_many_heads` says why).

On a machine without a CUDA GPU cuDNN cannot run, and ``impl="cudnn"`` raises a
``ValueError`` at trace time that names the implementations that work there,
rather than silently computing something else. Block sizes only steer the Pallas
fallback (cuDNN picks its own tiles).

Numerics: cuDNN returns its output in the input dtype (a ring merges the
per-step outputs in float32 after that rounding). In the causal case keys go
through :mod:`lca.attention.nonfinite`, so a NaN or inf key reaches only the
queries that see it; without mask every query sees it anyway.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

from lca.attention import inputs, nonfinite
from lca.attention.blocks import BlockSizes
from lca.attention.impl import IMPLS, LocalImpl, get_impl
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask, default_positions, segment_begins
from lca.attention.vjp import attention_vjp

# How one call is computed (position_case): branch indices of the run-time switch.
NO_MASK, CAUSAL, PALLAS = 0, 1, 2
CASE_NAMES = ("cuDNN without mask", "cuDNN causal", "Pallas")
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Head-dim columns the lse-cotangent fold adds: one is used, cuDNN wants multiples of 8.
FOLD_COLUMNS = 8
# The most documents (runs of equal segment ids) per row that a packed call takes. cuDNN
# keeps its softmax statistics per (row, document slot), [b * PACKED_MAX_RUNS, h, len]
# float32, so the bound costs memory; batches with more run Pallas.
PACKED_MAX_RUNS = 16


def _fa():
    """JAX's cuDNN attention module (private API), imported when a cuDNN call is traced."""
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


# --- where cuDNN can run -----------------------------------------------------------------


def require_cuda() -> None:
    """``ValueError`` unless the first JAX device is a CUDA GPU (cuDNN runs nowhere else)."""
    device = jax.devices()[0]
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    if device.platform in ("gpu", "cuda") and "rocm" not in version:
        return
    others = [name for name in IMPLS if name != "cudnn"]
    raise ValueError(
        f"impl='cudnn' runs cuDNN's fused attention and needs a CUDA GPU; the first JAX device "
        f"here is {device.platform} ({device.device_kind}). Use one of {others} instead "
        f"('pallas' runs the same fused-kernel algorithm, interpreted off GPU)."
    )


def _hopper_or_later(device=None) -> bool:
    """Is the device (default: the first) an sm_90 or later GPU? False off GPU."""
    capability = str(getattr(device or jax.devices()[0], "compute_capability", "") or "")
    major = capability.split(".")[0]
    return major.isdigit() and int(major) >= 9


def max_head_dim(device=None) -> int:
    """cuDNN's largest head_dim for bf16/fp16 flash attention: 256 on sm_90 and later, else 128."""
    return 256 if _hopper_or_later(device) else 128


def packs_documents(device=None) -> bool:
    """Does this GPU run cuDNN's packed (ragged) layout? sm_90 and later."""
    return _hopper_or_later(device)


def fallback_reason(q, mask: Mask, logit: LogitOptions, *, segments: bool,
                    lse_cotangent: bool = False, head_dim_limit: int | None = None) -> str | None:
    """Why cuDNN cannot compute this call (the whole call goes to Pallas), or None when it can.

    Static: decided from q's dtype and head_dim (``q`` may be a ``ShapeDtypeStruct``),
    the mask and logit options, whether segment ids are given and, for a backward,
    whether the lse has a cotangent. ``head_dim_limit`` defaults to
    :func:`max_head_dim` of the first device. Positions are :func:`position_case`'s.
    """
    limit = max_head_dim() if head_dim_limit is None else head_dim_limit
    d = q.shape[-1]
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"dtype {jnp.dtype(q.dtype).name} (cuDNN's flash attention takes bfloat16 or float16)"
    if d % 8 or d > limit:
        return f"head_dim {d} (cuDNN needs a multiple of 8 up to {limit})"
    if logit.softcap is not None:
        return "softcap (cuDNN has no tanh soft cap)"
    if segments:
        return "segment ids (cuDNN's masks take per-row lengths, not per-token ids)"
    if mask.window is not None and not mask.causal:
        return "a window without causal (cuDNN's sliding window is left-only)"
    if lse_cotangent and d + FOLD_COLUMNS > limit:
        return (f"an lse cotangent with head_dim {d} (folding it in needs head_dim + "
                f"{FOLD_COLUMNS} <= {limit})")
    return None


def _is_run(pos):
    """Are these positions consecutive integers?"""
    return jnp.all(pos[1:] - pos[:-1] == 1)


def position_case(mask: Mask, q_pos, kv_pos):
    """``NO_MASK``, ``CAUSAL`` or ``PALLAS``: which call computes these positions exactly.

    ``q_pos [q_len]``, ``kv_pos [kv_len]`` int32. An int when the mask ignores
    positions; else a traced int32 (concrete under ``jax.ensure_compile_time_eval``).
    Only for calls that :func:`fallback_reason` lets through (so a non-full mask is causal).
    """
    if mask.is_full:
        return NO_MASK
    every_key = mask.block_full(q_pos.min(), q_pos.max(), kv_pos.min(), kv_pos.max())
    top_left = _is_run(q_pos) & _is_run(kv_pos) & (q_pos[0] == kv_pos[0]) & mask.causal
    if mask.causal and mask.window is None and q_pos.shape == kv_pos.shape:
        # The same increasing positions on both sides (a zigzag shard against itself, gaps
        # and all): index order is position order, so causal by position is causal by index.
        top_left = top_left | (jnp.all(q_pos == kv_pos) & jnp.all(q_pos[1:] > q_pos[:-1]))
    return jnp.where(every_key, NO_MASK, jnp.where(top_left, CAUSAL, PALLAS)).astype(jnp.int32)


def default_case(mask: Mask, q_len: int, kv_len: int) -> int:
    """:func:`position_case` of a plain call's default (bottom-right) positions, as an int."""
    with jax.ensure_compile_time_eval():
        return int(position_case(mask, *default_positions(q_len, kv_len)))


def _by_case(case, cudnn, pallas):
    """``cudnn(case)`` or ``pallas()``: a Python branch for a static case, ``lax.switch`` else."""
    if isinstance(case, int):
        return pallas() if case == PALLAS else cudnn(case)
    return lax.switch(case, [lambda: cudnn(NO_MASK), lambda: cudnn(CAUSAL), pallas])


# --- the cuDNN calls -------------------------------------------------------------------------


def _options(case: int, mask: Mask, logit: LogitOptions) -> dict:
    fa = _fa()
    return dict(
        scale=logit.scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
        mask_type=fa.MaskType.CAUSAL if case == CAUSAL else fa.MaskType.NO_MASK,
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=mask.window if case == CAUSAL else None,
    )


def _absent(q):
    """The empty operands cuDNN's primitives take for bias, lengths, offsets and page tables."""
    return [jnp.zeros((0,), q.dtype)] * 7


def cudnn_forward(q, k, v, *, case: int, mask: Mask, logit: LogitOptions):
    """cuDNN's forward: ``(out [b, q_len, h, d] in q.dtype, lse [b, h, q_len] float32)``."""
    if case == CAUSAL:
        k, v = nonfinite.forward_operands(k, v)
    out, stats = _fa()._dot_product_attention_fwd_p_wrapper.bind(
        q, k, v, *_absent(q), is_training=True, **_options(case, mask, logit))
    return out, stats


def fold_lse_cotangent(q, k, v, out, dout, dlse):
    """Operands for a backward without lse cotangent that yields the gradients *with* ``dlse``.

    A FlashAttention-2 backward forms ``ds = p * (dp - delta)`` with ``dp = dout @ v.T``
    and ``delta = rowsum(dout * out)``; an lse cotangent needs ``p * (dp - delta + dlse)``.
    One more head-dim column does it: ``v`` gets ones there and ``dout`` gets
    ``dlse``, so ``dp`` grows by ``dlse``, while ``out``, ``q`` and ``k`` get zeros,
    so ``delta`` and the logits do not change. ``FOLD_COLUMNS`` columns are added
    (the rest zeros); the gradients' first ``head_dim`` columns are the answer.

    ``q, out, dout [b, q_len, h, d]``, ``k, v [b, kv_len, h_kv, d]``, ``dlse [b, h, q_len]``.
    """

    def widen(x, column=None):
        extra = jnp.zeros((*x.shape[:-1], FOLD_COLUMNS), x.dtype)
        if column is not None:
            extra = extra.at[..., 0].set(column.astype(x.dtype))
        return jnp.concatenate([x, extra], axis=-1)

    return (widen(q), widen(k), widen(v, jnp.ones(v.shape[:-1], v.dtype)), widen(out),
            widen(dout, rearrange(dlse, "b h q -> b q h")))


def cudnn_backward(q, k, v, out, lse, dout, dlse, *, case: int, mask: Mask, logit: LogitOptions):
    """cuDNN's backward from the final ``out``/``lse``: ``(dq, dk, dv)`` float32 (dlse may be None)."""
    if case == CAUSAL:
        k, v = nonfinite.backward_operands(k, v)
    d = q.shape[-1]
    out, dout = out.astype(q.dtype), dout.astype(q.dtype)
    if dlse is not None:
        q, k, v, out, dout = fold_lse_cotangent(q, k, v, out, dout, dlse)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0).astype(jnp.float32)
    grads = _fa()._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, *_absent(q), lse, out, dout, **_options(case, mask, logit))
    return tuple(g[..., :d].astype(jnp.float32) for g in grads[:3])


# --- the step ----------------------------------------------------------------------------------


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, mask, logit, blocks, case=None):
    require_cuda()

    def pallas():
        return get_impl("pallas").forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, mask=mask,
                                          logit=logit, blocks=blocks)

    if fallback_reason(q, mask, logit, segments=q_seg is not None) is not None:
        return pallas()

    def cudnn(c):
        out, lse = cudnn_forward(q, k, v, case=c, mask=mask, logit=logit)
        return out.astype(jnp.float32), lse

    return _by_case(position_case(mask, q_pos, kv_pos) if case is None else case, cudnn, pallas)


def _backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, *, mask, logit, blocks,
              case=None):
    require_cuda()

    def pallas():
        return get_impl("pallas").backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                                           dlse, mask=mask, logit=logit, blocks=blocks)

    reason = fallback_reason(q, mask, logit, segments=q_seg is not None,
                             lse_cotangent=dlse is not None)
    if reason is not None:
        return pallas()

    def cudnn(c):
        return cudnn_backward(q, k, v, out, lse, dout, dlse, case=c, mask=mask, logit=logit)

    return _by_case(position_case(mask, q_pos, kv_pos) if case is None else case, cudnn, pallas)


def forward(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, mask: Mask, logit: LogitOptions,
            blocks: BlockSizes | None = None):
    """The step forward: ``(out [b, q_len, h, d] float32, lse [b, h, q_len] float32)``.

    Signature of :func:`lca.attention.blockwise_forward`; positions place the
    chunks anywhere in the global sequence (see the module docstring for which
    call runs).
    """
    return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, mask=mask, logit=logit, blocks=blocks)


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None, *, mask: Mask,
             logit: LogitOptions, blocks: BlockSizes | None = None):
    """The step backward from the final ``out``/``lse``: ``(dq, dk, dv)`` float32 (dlse may be None)."""
    return _backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, mask=mask,
                     logit=logit, blocks=blocks)


# --- packed documents ----------------------------------------------------------------------------


def segment_runs(seg, max_runs: int = PACKED_MAX_RUNS):
    """cuDNN's packed-layout description of each row's runs of equal segment ids.

    ``seg [b, len]`` int. Returns ``(lengths [b, max_runs], starts [b, max_runs + 1],
    exact)``: the length and first index of each run in order, -1 past the row's last
    run (cuDNN's convention), and a bool scalar, true when every row has at most
    ``max_runs`` runs and no id in two of its runs. Then attending within runs is
    attending among equal ids, lca's rule.
    """
    b, n = seg.shape
    index = jnp.arange(n, dtype=jnp.int32)
    begins = segment_begins(seg)
    run = jnp.cumsum(begins, axis=1, dtype=jnp.int32) - 1
    runs = run[:, -1] + 1
    slot = jnp.where(begins, run, max_runs + 1)  # out of range: dropped
    starts = jnp.full((b, max_runs + 1), -1, jnp.int32)
    starts = starts.at[jnp.arange(b)[:, None], slot].set(jnp.broadcast_to(index, (b, n)), mode="drop")
    ends = jnp.where(starts[:, 1:] >= 0, starts[:, 1:], n)
    lengths = jnp.where(starts[:, :max_runs] >= 0, ends - starts[:, :max_runs], -1)
    ordered = jnp.sort(seg, axis=1)
    distinct = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1, dtype=jnp.int32)
    exact = jnp.all((runs <= max_runs) & (runs == distinct))
    return lengths, starts, exact


def _packed_options(mask: Mask, logit: LogitOptions) -> dict:
    fa = _fa()
    mask_type = fa.MaskType.PADDING_CAUSAL if mask.causal else fa.MaskType.PADDING
    return dict(_options(NO_MASK, mask, logit), mask_type=mask_type)


def _packed_operands(q, lengths, starts):
    """Bias, q/kv lengths, q/kv offsets and page tables for a packed self-attention call."""
    empty = jnp.zeros((0,), q.dtype)
    return [empty, lengths, lengths, starts, starts, empty, empty]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _packed(mask: Mask, logit: LogitOptions, q, k, v, lengths, starts):
    return _packed_forward(mask, logit, q, k, v, lengths, starts)[0]


def _packed_forward(mask, logit, q, k, v, lengths, starts):
    fk, fv = nonfinite.forward_operands(k, v)
    out, stats = _fa()._dot_product_attention_fwd_p_wrapper.bind(
        q, fk, fv, *_packed_operands(q, lengths, starts), is_training=True, **_packed_options(mask, logit))
    return out, (q, k, v, lengths, starts, out, stats)


def _packed_backward(mask, logit, residuals, dout):
    q, k, v, lengths, starts, out, stats = residuals
    bk, bv = nonfinite.backward_operands(k, v)
    dq, dk, dv = _fa()._dot_product_attention_bwd_p_wrapper.bind(
        q, bk, bv, *_packed_operands(q, lengths, starts), stats, out, dout.astype(q.dtype),
        **_packed_options(mask, logit))[:3]
    return dq, dk, dv, None, None


_packed.defvjp(_packed_forward, _packed_backward)


def _as_many_heads(q, k, v):
    """``k, v`` with q's number of heads (GQA groups repeated) for a packed call.

    JAX turns the per-document offsets into element offsets with the *query's* heads x
    head_dim for K and V too (``fused_attention_stablehlo._fix_seqlen_offsets`` in jax
    0.10), which is K's stride only when it has as many heads. The repeat's gradient
    sums each group back.
    """
    group = q.shape[2] // k.shape[2]
    if group == 1:
        return k, v
    return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


def packed_reason(q, k, mask: Mask, logit: LogitOptions, *, segments: bool, defaults: bool,
                  return_lse: bool) -> str | None:
    """Why a call cannot take the packed-documents path (module docstring, 4.), or None."""
    if not segments:
        return "no segment ids"
    if not defaults or q.shape[1] != k.shape[1]:
        return "explicit positions or q_len != kv_len (packing is for self-attention)"
    if return_lse:
        return "the lse is returned (the packed layout's statistics are cuDNN's own)"
    if mask.window is not None:
        return "a window"
    if not packs_documents():
        return "a GPU before sm_90 (cuDNN's packed layout needs Hopper)"
    return fallback_reason(q, mask, logit, segments=False)


# --- the single-device function ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a ``custom_vjp`` nondiff arg)."""

    mask: Mask
    logit: LogitOptions
    blocks: BlockSizes
    case: int | None  # from default positions; None: from the positions at run time


def _static_forward(st: _Static, *args):
    return _forward(*args, mask=st.mask, logit=st.logit, blocks=st.blocks, case=st.case)


def _static_backward(st: _Static, *args):
    return _backward(*args, mask=st.mask, logit=st.logit, blocks=st.blocks, case=st.case)


# ``(out in q.dtype, lse f32)``, differentiable by cuDNN's backward (or the fallback's).
_attention = attention_vjp(_static_forward, _static_backward)


def cudnn_attention(
    q, k, v, *, causal: bool = False, segment_ids=None, window: int | None = None,
    softcap: float | None = None, scale: float | None = None, block_q: int | None = None,
    block_kv: int | None = None, block_q_bwd: int | None = None, block_kv_bwd: int | None = None,
    return_lse: bool = False, q_positions=None, kv_positions=None,
):
    """Attention with ``reference_attention``'s semantics through cuDNN (Pallas where it cannot).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``; k, v: ``[batch, kv_len,
        num_kv_heads, head_dim]`` (GQA/MQA native in cuDNN), bfloat16 or float16
        for cuDNN (other dtypes run the Pallas kernels).
      causal, segment_ids, window, softcap, scale, q_positions, kv_positions: as in
        ``reference_attention``; which of them cuDNN expresses is in the module docstring.
      block_q, block_kv, block_q_bwd, block_kv_bwd: forward and backward tiles of the
        Pallas fallback (None: its defaults).
      return_lse: also return ``lse [batch, num_heads, q_len]`` float32 (differentiable).

    Returns:
      ``out [batch, q_len, num_heads, head_dim]`` in q's dtype (and ``lse``).

    Raises:
      ValueError: without a CUDA GPU (naming the implementations that work), or on bad input.
    """
    require_cuda()
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    mask = inputs.make_mask(causal, window)
    defaults = q_positions is None and kv_positions is None
    q_pos, kv_pos = inputs.positions(q_positions, kv_positions, q_len, kv_len)
    st = _Static(mask, inputs.logit_options(d, scale, softcap),
                 inputs.block_sizes(block_q, block_kv, block_q_bwd, block_kv_bwd),
                 default_case(mask, q_len, kv_len) if defaults else None)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    with_lse = inputs.flag("return_lse", return_lse)
    if packed_reason(q, k, mask, st.logit, segments=segs is not None, defaults=defaults,
                     return_lse=with_lse) is None:
        lengths, starts, exact = segment_runs(q_seg)
        return lax.cond(exact & jnp.all(q_seg == kv_seg),
                        lambda: _packed(mask, st.logit, q, *_as_many_heads(q, k, v), lengths, starts),
                        lambda: _attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0])
    out, lse = _attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if with_lse else out


# cuDNN's primitives and the interpreted Pallas fallback carry no varying-axes
# information, so ring/Ulysses/USP run their shard_map unchecked for this impl.
CUDNN = LocalImpl("cudnn", cudnn_attention, forward, backward, default_blocks=None,
                  check_vma=False, require=lambda: require_cuda())  # late-bound: tests may stand in for it
