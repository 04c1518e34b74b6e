"""Keys and values a query cannot see never reach its output, even when they are NaN or inf.

A mask applied by multiplication leaks: a masked probability is 0, and
``0 * NaN`` is NaN, so one non-finite value would poison every row of its tile
(``p @ v``) or of its gradient (``ds @ k``). Selection does not leak, so every
implementation feeds its products these operands instead of ``k`` and ``v``:

* forward: a key whose ``k`` or ``v`` row is not finite gets ``k = NaN`` and
  ``v = 0``. Its logit is NaN, which the mask's ``where`` replaces by ``-inf``
  for the rows that cannot see it and keeps for the rows that can (their output
  is NaN, as it should be), while ``p @ v`` only ever sees finite values.
* backward: such a key gets ``k = v = 0``, so ``dp = do @ v.T`` and ``dq = ds @ k``
  stay finite where ``p`` and ``ds`` are 0. The rows that see it are NaN
  through ``delta = rowsum(dout * out)``.

For finite inputs both are the identity.
"""

from __future__ import annotations

import jax.numpy as jnp


def finite_keys(k, v):
    """Bool ``[..., kv_len, h_kv]``: the key's ``k`` and ``v`` rows are both finite."""
    return jnp.isfinite(k).all(axis=-1) & jnp.isfinite(v).all(axis=-1)


def forward_operands(k, v):
    """``(k, v)`` for the forward: non-finite keys as ``(NaN, 0)`` rows."""
    ok = finite_keys(k, v)[..., None]
    return jnp.where(ok, k, jnp.nan).astype(k.dtype), jnp.where(ok, v, 0).astype(v.dtype)


def backward_operands(k, v):
    """``(k, v)`` for the backward: non-finite keys as zero rows."""
    ok = finite_keys(k, v)[..., None]
    return jnp.where(ok, k, 0).astype(k.dtype), jnp.where(ok, v, 0).astype(v.dtype)
