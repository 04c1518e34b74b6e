"""The memory model M: a bias-free MLP whose weights are learned at test time.

Weights are a tuple of matrices ``W_l [d_out, d_in]``, one per layer, applied as
``h <- act(h @ W_l.T)`` with no activation after the last layer. Depth 1 is the
linear memory ``M(k) = W k`` (a delta-rule / linear-attention state).

Besides plain application this module gives the two things the chunk-parallel
update needs in closed form: every layer's input activations and the
per-token output-gradients ``delta_l`` of the loss ``||M(k) - v||^2``, so that
the per-token weight gradient is the outer product ``delta_l a_l^T``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Weights = tuple[jax.Array, ...]
Activation = Callable[[jax.Array], jax.Array]


def layer_widths(dim: int, depth: int, expansion: int) -> tuple[int, ...]:
    """Widths ``(dim, hidden, ..., hidden, dim)`` of a depth-``depth`` memory MLP."""
    hidden = dim * expansion
    return (dim,) + (hidden,) * (depth - 1) + (dim,)


def init_weights(key: jax.Array, widths: tuple[int, ...], *, leading: tuple[int, ...] = ()) -> Weights:
    """Initial memory weights, ``leading + (d_out, d_in)`` per layer, variance 1/d_in."""
    keys = jax.random.split(key, len(widths) - 1)
    return tuple(
        jax.random.normal(k, leading + (d_out, d_in), jnp.float32) / jnp.sqrt(d_in)
        for k, d_in, d_out in zip(keys, widths[:-1], widths[1:], strict=True)
    )


def apply(weights: Weights, x: jax.Array, act: Activation) -> jax.Array:
    """``M(x)`` for ``x [..., d_in]``: the retrieval M*(q) when ``x`` is a query."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w.T
        if i < len(weights) - 1:
            h = act(h)
    return h


def loss(weights: Weights, k: jax.Array, v: jax.Array, act: Activation) -> jax.Array:
    """The associative-memory loss ``sum ||M(k) - v||^2`` over tokens."""
    return jnp.sum((apply(weights, k, act) - v) ** 2)


def activations_and_deltas(
    weights: Weights, k: jax.Array, v: jax.Array, act: Activation
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per-token backprop of ``||M(k_t) - v_t||^2`` for ``k [n, d_in]``, ``v [n, d_out]``.

    Returns ``inputs[l] [n, d_in_l]`` (what layer l saw) and ``deltas[l] [n, d_out_l]``
    (d loss_t / d pre-activation of layer l), so ``grad_t W_l = deltas[l][t] (x) inputs[l][t]``.
    """
    inputs, pre = [], []
    h = k
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w.T
        pre.append(z)
        h = act(z) if i < len(weights) - 1 else z
    delta = 2.0 * (h - v)
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        slope = jax.jvp(act, (pre[i - 1],), (jnp.ones_like(pre[i - 1]),))[1]
        delta = (delta @ weights[i]) * slope
        deltas.append(delta)
    return inputs, deltas[::-1]


def clip_factor(grad_sq_norm: jax.Array, max_norm: float | None) -> jax.Array:
    """``min(1, max_norm / ||grad||)`` per token from ``grad_sq_norm [...]``; ones when ``max_norm`` is None.

    From the squared norm, so its gradient is finite at a zero gradient (a norm's is not).
    """
    if max_norm is None:
        return jnp.ones_like(grad_sq_norm)
    return max_norm * jax.lax.rsqrt(jnp.maximum(grad_sq_norm, max_norm**2))


def grad_sq_norms(inputs: list[jax.Array], deltas: list[jax.Array]) -> jax.Array:
    """``[n]``: each token's squared gradient norm over all layers, ``sum_l ||delta_l||^2 ||a_l||^2``
    (the squared Frobenius norm of the outer product ``delta_l a_l^T``)."""
    return sum(jnp.sum(d * d, -1) * jnp.sum(a * a, -1) for a, d in zip(inputs, deltas, strict=True))
