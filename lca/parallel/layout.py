"""Sequence layouts: which global tokens each device of a context axis holds.

A sequence of ``seq_len`` tokens sharded over ``n`` devices is stored in
*layout order*: device ``i`` holds the ``i``-th contiguous slice of length
``seq_len // n`` of the layout-ordered sequence. The layout says which natural
(global) token sits at each layout slot:

* ``contiguous``: natural order; device ``i`` holds tokens ``[i L, (i+1) L)``.
  With causal masking the last device does ~all the work and the first almost none.
* ``zigzag``: the sequence is cut into ``2 n`` chunks and device ``i`` holds
  chunks ``i`` and ``2 n - 1 - i``, so every device does the same causal work.
* ``striped``: device ``i`` holds tokens ``i, i + n, i + 2 n, ...`` (balanced
  up to one token per row).

``permutation(layout, seq_len, n)[s]`` is the natural index of layout slot
``s``: ``x_layout = x_natural[:, perm]``. A data pipeline can reorder its tokens
once with :func:`to_layout` and then tell the attention ``input_layout=layout``
instead of paying a permutation in every layer. Attention code only ever needs
the *positions* of the local tokens (:func:`local_positions`), which is what makes
every layout correct under the one position-based mask.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}.")


def required_multiple(layout: str, n: int) -> int:
    """The sequence length must be a multiple of this for ``layout`` over ``n`` devices."""
    check_layout(layout)
    return 2 * n if layout == "zigzag" else n


def num_chunks(layout: str) -> int:
    """How many runs of consecutive positions each device holds (zigzag: 2)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def position_runs(layout: str, n: int) -> int | None:
    """How many equal chunks of consecutive positions ``layout`` over ``n`` devices cuts a sequence into (``n``
    times :func:`num_chunks`); None where it deals tokens out one by one (``striped`` over more than one device)."""
    check_layout(layout)
    if n == 1:
        return 1
    return None if layout == "striped" else num_chunks(layout) * n


def check_length(layout: str, seq_len: int, n: int, *, name: str = "sequence length",
                 axis: str | None = None) -> int:
    """Validate ``seq_len`` for ``layout`` over ``n`` devices; return the local length."""
    multiple = required_multiple(layout, n)
    if seq_len % multiple:
        where = f" over mesh axis {axis!r}" if axis is not None else ""
        lower = seq_len - seq_len % multiple
        raise ValueError(
            f"{name} {seq_len} must be a multiple of {multiple} for layout={layout!r} on "
            f"{n} devices{where} ({'2 chunks per device' if layout == 'zigzag' else 'one shard per device'}); "
            f"pad it to {lower + multiple}"
            + (f" or truncate to {lower}" if lower else "")
            + (", or use layout='contiguous'" if layout == "zigzag" and seq_len % n == 0 else "")
            + "."
        )
    return seq_len // n


def check_input_layout(input_layout: str, layout: str) -> None:
    if input_layout not in ("natural", layout):
        raise ValueError(
            f"input_layout must be 'natural' (tokens in sequence order) or equal to "
            f"layout={layout!r} (tokens already reordered with lca.parallel.to_layout), "
            f"got {input_layout!r}."
        )


def check_global_length(layout: str, input_layout: str, length: int, n: int, *, name: str,
                        axis) -> None:
    """The global length must split as ``layout`` (and its in-place conversion) needs."""
    check_length(layout, length, n, name=name, axis=axis)
    multiple = natural_input_multiple(layout, n)
    if input_layout == "natural" and length % multiple:
        raise ValueError(
            f"{name} {length} must be a multiple of {multiple} to convert natural-order input "
            f"to layout={layout!r} on {n} devices of mesh axis {axis!r}; pad it, reorder the "
            f"data once with lca.parallel.to_layout and pass input_layout={layout!r}, or use "
            f"layout='zigzag'."
        )


def local_positions(layout: str, local_len: int, n: int, index, xp=np):
    """Natural positions ``[local_len]`` of the tokens device ``index`` holds.

    ``index`` may be a traced ``lax.axis_index`` (pass ``xp=jax.numpy``).
    """
    check_layout(layout)
    ar = xp.arange(local_len, dtype=np.int32)
    if layout == "contiguous":
        return ar + index * local_len
    if layout == "striped":
        return ar * n + index
    chunk = local_len // 2
    first = ar[:chunk] + index * chunk
    second = ar[:chunk] + (2 * n - 1 - index) * chunk
    return xp.concatenate([first, second])


def permutation(layout: str, seq_len: int, n: int) -> np.ndarray:
    """``perm [seq_len]`` int32 with ``x_layout = x_natural[:, perm]``."""
    local_len = check_length(layout, seq_len, n)
    return np.concatenate([local_positions(layout, local_len, n, i) for i in range(n)]).astype(np.int32)


def zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """Device ``i`` of ``n`` holds chunks ``i`` and ``2n-1-i`` of ``2n`` equal chunks."""
    return permutation("zigzag", seq_len, n)


def striped_permutation(seq_len: int, n: int) -> np.ndarray:
    """Device ``i`` of ``n`` holds tokens ``i, i+n, i+2n, ...``."""
    return permutation("striped", seq_len, n)


def inverse_permutation(perm) -> np.ndarray:
    perm = np.asarray(perm)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def to_layout(x, layout: str, n: int, axis: int = 1):
    """Reorder natural-order ``x`` along ``axis`` into ``layout`` for ``n`` devices.

    Works on numpy and JAX arrays (do it once in the data pipeline, on host).
    """
    perm = permutation(layout, x.shape[axis], n)
    return x.take(perm, axis=axis) if hasattr(x, "take") else np.take(x, perm, axis=axis)


def from_layout(x, layout: str, n: int, axis: int = 1):
    """Inverse of :func:`to_layout`: back to natural order along ``axis``."""
    inv = inverse_permutation(permutation(layout, x.shape[axis], n))
    return x.take(inv, axis=axis) if hasattr(x, "take") else np.take(x, inv, axis=axis)


# --- Converting shards inside shard_map ---------------------------------------------
#
# A global array in natural order, sharded contiguously over a mesh axis, can be put
# into a layout with collectives on the shards alone (O(T/n) memory per device, no
# gather): zigzag needs two ppermutes, striped one all_to_all.


def _owner(chunk: int, n: int) -> int:
    """Device that holds zigzag chunk ``chunk`` of ``2n``."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def _zigzag_routes(n: int):
    """ppermute pairs sending each device's even / odd natural chunk to its zigzag owner."""
    even = [(i, _owner(2 * i, n)) for i in range(n)]
    odd = [(i, _owner(2 * i + 1, n)) for i in range(n)]
    return even, odd


def _by_parity(a, b, index):
    """``(a, b)`` on even devices, ``(b, a)`` on odd ones."""
    odd = index % 2 == 1
    return jnp.where(odd, b, a), jnp.where(odd, a, b)


def shard_to_layout(x, layout: str, axis_name, seq_axis: int = 1):
    """Inside ``shard_map``: contiguous (natural-order) shard -> ``layout`` shard.

    ``x`` is this device's shard of a sequence split contiguously over
    ``axis_name``; the result is its shard of the same sequence in ``layout``.
    """
    check_layout(layout)
    n = lax.axis_size(axis_name)
    if layout == "contiguous" or n == 1:
        return x
    if layout == "zigzag":
        even_route, odd_route = _zigzag_routes(n)
        first, second = jnp.split(x, 2, axis=seq_axis)  # natural chunks 2i and 2i+1
        got_even = lax.ppermute(first, axis_name, even_route)
        got_odd = lax.ppermute(second, axis_name, odd_route)
        # Device d keeps chunk d first: the even one when d is even, else the odd one.
        slot0, slot1 = _by_parity(got_even, got_odd, lax.axis_index(axis_name))
        return jnp.concatenate([slot0, slot1], axis=seq_axis)
    # striped: local natural token a * n + r goes to device r, slot (source, a).
    x = jnp.moveaxis(x, seq_axis, 1)
    local = x.shape[1]
    y = x.reshape(x.shape[0], local // n, n, *x.shape[2:])
    y = lax.all_to_all(y, axis_name, split_axis=2, concat_axis=2, tiled=True)  # [b, a, source]
    y = jnp.swapaxes(y, 1, 2).reshape(x.shape)
    return jnp.moveaxis(y, 1, seq_axis)


def shard_from_layout(x, layout: str, axis_name, seq_axis: int = 1):
    """Inverse of :func:`shard_to_layout`: ``layout`` shard -> contiguous natural shard."""
    check_layout(layout)
    n = lax.axis_size(axis_name)
    if layout == "contiguous" or n == 1:
        return x
    if layout == "zigzag":
        even_route, odd_route = _zigzag_routes(n)
        # Slots hold chunks d and 2n-1-d; one of them is even. Send each home.
        even, odd = _by_parity(*jnp.split(x, 2, axis=seq_axis), lax.axis_index(axis_name))
        back_even = lax.ppermute(even, axis_name, [(dst, src) for src, dst in even_route])
        back_odd = lax.ppermute(odd, axis_name, [(dst, src) for src, dst in odd_route])
        return jnp.concatenate([back_even, back_odd], axis=seq_axis)
    x = jnp.moveaxis(x, seq_axis, 1)
    local = x.shape[1]
    y = x.reshape(x.shape[0], n, local // n, *x.shape[2:])  # [b, source, a]
    y = jnp.swapaxes(y, 1, 2)  # [b, a, source]
    y = lax.all_to_all(y, axis_name, split_axis=2, concat_axis=2, tiled=True)
    return jnp.moveaxis(y.reshape(x.shape), 1, seq_axis)


def natural_input_multiple(layout: str, n: int) -> int:
    """Length multiple needed to convert natural-order shards to ``layout`` in place."""
    check_layout(layout)
    return {"contiguous": n, "zigzag": 2 * n, "striped": n * n}[layout]
