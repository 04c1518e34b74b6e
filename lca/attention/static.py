"""Static integer options (block sizes, window): Python or NumPy integers, checked in one place.

Block sizes and windows shape the traced program, so they must be concrete at
trace time. Anything ``operator.index`` accepts (``16``, ``np.int64(16)``) is
taken and normalised to ``int``; bools, floats and traced values are refused
with a ``ValueError`` that names the argument.
"""

from __future__ import annotations

import operator

import jax


def positive_int(name: str, value) -> int:
    """``value`` as a positive ``int``, or a ``ValueError`` naming ``name`` and what would work."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static positive int, got a traced value {value!r}: mark it "
            f"static (jax.jit(..., static_argnames=({name!r},))) or bind it with "
            f"functools.partial before jit."
        )
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int, got the bool {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be a positive int (a Python or NumPy integer), got {value!r} "
            f"of type {type(value).__name__}."
        ) from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={number}.")
    return number
