"""Checks for the static options of attention calls (flags, sizes, numbers).

Options such as ``causal``, ``window``, ``softcap``, ``scale`` and block sizes
decide the shape of the traced program, so they must be Python values when the
call is traced. Passing one through ``jax.jit`` as an ordinary argument turns it
into a tracer; these checks say so, and how to keep it static, instead of
failing later on a confusing type error.
"""

from __future__ import annotations

import operator

import jax
import numpy as np


def require_static(name: str, value, example) -> None:
    """``ValueError`` when ``value`` (the option ``name``) is a tracer, not a Python value.

    ``example`` is a value of the right kind, shown in the suggested fix.
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static Python value, got {value!r}: it was passed through "
            f"jax.jit (or another transformation) as an array argument. Mark it static, "
            f"e.g. jax.jit(fn, static_argnames=({name!r},)), or bind it before jitting with "
            f"functools.partial(fn, {name}={example!r}). Every option of an attention call "
            f"(causal, window, softcap, scale, block sizes, layout, impl, return_lse) is "
            f"static; only q, k, v, segment_ids and positions are arrays."
        )


def positive_int(name: str, value, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as a Python int > 0 (integer-likes such as ``np.int64`` accepted), or None.

    ``ValueError`` naming ``name`` for anything else (bools, floats, 0, negatives,
    tracers); ``hint`` is appended to the message.
    """
    if value is None and allow_none:
        return None
    require_static(name, value, 512 if name.startswith("block") else 8)
    expected = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be {expected}, got the bool {value!r}{hint}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be {expected} (a Python or NumPy integer), got {value!r} of type "
            f"{type(value).__name__}{hint}."
        ) from None
    if number <= 0:
        raise ValueError(f"{name} must be {expected}, got {name}={number}{hint}.")
    return number
