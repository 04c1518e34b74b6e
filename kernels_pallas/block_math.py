"""The per-tile math of flash attention, shared by every kernel backend.

Each function works on values already loaded from refs (2-D tiles), so the
portable, Mosaic GPU and Mosaic TPU kernels run literally the same arithmetic
and differ only in how tiles reach memory. Shapes (one head):

* ``q [bq, d]``, ``k, v [bk, d]``;
* query positions/segments as a column ``[bq, 1]``, key ones as a row ``[1, bk]``
  (2-D so Mosaic needs no 1-D vector layouts);
* running statistics ``m, l [bq, 1]`` and accumulator ``acc [bq, d]``, float32.

Masking follows :class:`lca.attention.mask.Mask` (positions in the key frame,
``softcap`` before masking); a row that sees no key ends with ``l == 0`` and is
finalised to ``out = 0``, ``lse = -inf``. ``ok=None`` is a tile every query sees
whole (no ``where`` at all).

``base2=True`` runs the softmax in base 2, as JAX's Triton example kernel does:
logits come out multiplied by ``log2(e)`` (folded into the one scale multiply),
``exp2`` replaces ``exp``, and ``m`` is in base-2 units. :func:`finalize` still
returns the natural-log ``lse``, and the backward takes ``lse * LOG2E``, so
callers, residuals and ring merges see the same values either way.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask

LOG2E = math.log2(math.e)  # exp(x) = exp2(x log2 e): the kernels' softmax runs in base 2
LN2 = math.log(2.0)  # and a base-2 lse m returns to natural log as m ln 2

# q @ k.T without materialising the transpose.
_NT = (((1,), (1,)), ((), ()))
# p.T @ do (dk/dv): contract the query axis.
_TN = (((0,), (0,)), ((), ()))


def visible(mask: Mask, q_col, kv_row, kv_valid_row, q_seg_col=None, kv_seg_row=None):
    """Boolean ``[bq, bk]``: :meth:`Mask.visible` on a column/row tile, plus padding and segments."""
    diff = q_col - kv_row
    ok = jnp.broadcast_to(kv_valid_row, diff.shape)
    if mask.causal:
        ok = ok & (diff >= 0)
    if mask.window is not None:
        ok = ok & (jnp.abs(diff) < mask.window)
    if q_seg_col is not None:
        ok = ok & (q_seg_col == kv_seg_row)
    return ok


def _exp(base2: bool):
    return jnp.exp2 if base2 else jnp.exp


def logits(q, k, logit: LogitOptions, ok=None, *, base2: bool = False):
    """Logits ``[bq, bk]`` (``-inf`` where ``ok`` is False) and the softcap's tanh (None without one).

    With ``base2`` the logits are in base-2 units: ``scale * log2(e)`` (or
    ``softcap * log2(e)`` outside the tanh) is one multiply per element.
    """
    scores = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
    unit = LOG2E if base2 else 1.0
    if logit.softcap is None:
        s, tanh = scores * (logit.scale * unit), None
    elif base2:
        tanh = jnp.tanh(scores * (logit.scale / logit.softcap))
        s = tanh * (logit.softcap * unit)
    else:  # exactly LogitOptions.apply, so the natural-unit kernels are unchanged
        s = logit.apply(scores)
        tanh = s / logit.softcap
    return (s if ok is None else jnp.where(ok, s, -jnp.inf)), tanh


def online_softmax_step(m, l, acc, s, v, *, base2: bool = False):
    """Fold one key tile's logits ``s [bq, bk]`` and values ``v [bk, d]`` into ``(m, l, acc)``."""
    exp = _exp(base2)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet
    p = exp(s - m_safe)
    alpha = exp(m - m_safe)
    l = alpha * l + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv


def finalize(m, l, acc, *, base2: bool = False):
    """``(out [bq, d], lse [bq, 1])`` from the running statistics; 0 / -inf for empty rows.

    ``lse`` is in natural-log units either way (``m`` in the logits' units).
    """
    has_key = l > 0
    l_safe = jnp.where(has_key, l, 1.0)
    lse = (m * LN2 if base2 else m) + jnp.log(l_safe)
    return acc / l_safe, jnp.where(has_key, lse, -jnp.inf)


def probs_and_dlogits(q, k, v, do, lse, delta, logit: LogitOptions, ok=None, *, base2: bool = False):
    """FlashAttention-2 backward of one tile: ``p [bq, bk]`` and ``ds = dL/dscores [bq, bk]``.

    ``lse``/``delta`` are ``[bq, 1]``: the final log-sum-exp in the logits' units
    (``lse * LOG2E`` with ``base2``; 0 for empty rows, whose logits are all
    ``-inf``) and ``rowsum(dout * out) - dlse``. ``ds`` includes the softcap
    derivative and the logit scale, so ``dq = ds @ k`` and ``dk = ds.T @ q``.
    """
    s, tanh = logits(q, k, logit, ok, base2=base2)
    p = _exp(base2)(s - lse)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if tanh is not None:
        ds = ds * (1.0 - jnp.square(tanh))
    return p, ds * logit.scale


def dq_tile(ds, k):
    return jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)


def dkv_tiles(p, ds, q, do):
    """``(dk [bk, d], dv [bk, d])`` contributions of one tile."""
    dv = lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
    dk = lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
    return dk, dv
