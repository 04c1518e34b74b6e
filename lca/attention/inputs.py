"""Trace-time validation of attention inputs, shared by every variant.

Every check runs on static shapes and dtypes, so a bad call fails with a
``ValueError`` naming the argument and the shapes it got while tracing, before
any computation (and never as a NaN or a silent broadcast later). Options that
must be static (flags, sizes, numbers) say so when they arrive traced (see
:mod:`lca.attention.static`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lca.attention.blocks import BlockSizes
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask, default_positions
from lca.attention.static import positive_int, require_static


def check_qkv(q, k, v):
    """Validate ``q [b, q_len, h, d]``, ``k, v [b, kv_len, h_kv, d]``; return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, length, heads, head_dim], got shape "
                f"{getattr(x, 'shape', type(x))}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}.")
    b, q_len, h, d = q.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
            f"cast them first (accumulation is float32 whatever the input dtype)."
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [batch, kv_len, num_kv_heads, head_dim], "
            f"got k {k.shape} and v {v.shape}."
        )
    kb, kv_len, h_kv, kd = k.shape
    if kb != b:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape} and k {k.shape}.")
    if kd != d:
        raise ValueError(
            f"q and k must have the same head_dim, got q {q.shape} and k {k.shape}."
        )
    if h % h_kv:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads (MHA, GQA or MQA), got q {q.shape} "
            f"with {h} heads and k {k.shape} with {h_kv} kv heads; use num_kv_heads in "
            f"{[n for n in range(1, h + 1) if h % n == 0]}."
        )
    if q_len == 0 or kv_len == 0:
        raise ValueError(f"q and k must have positive length, got q {q.shape} and k {k.shape}.")
    return b, q_len, kv_len, h, h_kv, d


def split_segment_ids(segment_ids, batch: int, q_len: int, kv_len: int):
    """Normalise ``segment_ids`` to ``(q_seg [b, q_len], kv_seg [b, kv_len])`` int32, or ``None``.

    Accepts one ``[batch, len]`` array for self-attention (``q_len == kv_len``)
    or a pair ``(q_segment_ids, kv_segment_ids)``.
    """
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                f"segment_ids must be one [batch, len] array or a pair (q_segment_ids, "
                f"kv_segment_ids), got a sequence of {len(segment_ids)}."
            )
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"a single segment_ids array needs q_len == kv_len, got q_len={q_len}, "
                f"kv_len={kv_len}; pass a pair (q_segment_ids [batch, {q_len}], "
                f"kv_segment_ids [batch, {kv_len}])."
            )
        q_seg = kv_seg = segment_ids
    for name, seg, n in (("q_segment_ids", q_seg, q_len), ("kv_segment_ids", kv_seg, kv_len)):
        shape = tuple(getattr(seg, "shape", ()))
        if shape != (batch, n):
            raise ValueError(f"{name} must have shape [batch, len] = {(batch, n)}, got {shape}.")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {seg.dtype}.")
    return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def positions(q_positions, kv_positions, q_len: int, kv_len: int):
    """Validate optional position overrides; fill in the bottom-right default."""
    q_default, kv_default = default_positions(q_len, kv_len)
    out = []
    for name, pos, n, default in (
        ("q_positions", q_positions, q_len, q_default),
        ("kv_positions", kv_positions, kv_len, kv_default),
    ):
        if pos is None:
            out.append(default)
            continue
        shape = tuple(getattr(pos, "shape", ()))
        if shape != (n,):
            raise ValueError(f"{name} must have shape [len] = {(n,)}, got {shape}.")
        if not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {pos.dtype}.")
        out.append(jnp.asarray(pos, jnp.int32))
    return tuple(out)


def logit_options(head_dim: int, scale=None, softcap=None) -> LogitOptions:
    """Resolve the default ``scale = 1/sqrt(head_dim)`` and check ``softcap``."""
    require_static("scale", scale, 0.125)
    require_static("softcap", softcap, 30.0)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not np.isscalar(scale) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number, got {scale!r}.")
    if softcap is not None and (not np.isscalar(softcap) or not softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}.")
    return LogitOptions(scale=float(scale), softcap=None if softcap is None else float(softcap))


def make_mask(causal, window) -> Mask:
    """The :class:`Mask` of ``causal`` (a bool) and ``window`` (a positive int-like or None)."""
    require_static("causal", causal, True)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}.")
    return Mask(causal=bool(causal), window=window)


def block_sizes(block_q, block_kv, block_q_bwd=None, block_kv_bwd=None) -> BlockSizes:
    """The user's tile sizes: positive int-likes, or None for the implementation's default.

    ``block_q_bwd``/``block_kv_bwd`` tile the backward (None: the implementation's
    backward default, which for blockwise is the forward's sizes).
    """
    hint = " (None: the implementation's default)"
    given = dict(block_q=block_q, block_kv=block_kv, block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd)
    return BlockSizes(**{name: positive_int(name, value, allow_none=True, hint=hint)
                         for name, value in given.items()})


def flag(name: str, value) -> bool:
    """A static bool option such as ``return_lse``."""
    require_static(name, value, True)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}.")
    return bool(value)
