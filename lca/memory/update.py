"""The chunk-parallel Titans memory update (Behrouz, Zhong & Mirrokni, 2025, Sec. 3.2).

Per token t, with data-dependent learning rate theta_t, momentum eta_t and forgetting alpha_t:

    S_t = eta_t S_{t-1} - theta_t grad_t
    M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = M_t(q_t)

where ``grad_t`` is the gradient of ``||M(k_t) - v_t||^2``. As in the paper, every
gradient of a chunk of ``chunk_size`` tokens is taken at the chunk-start weights;
across chunks the weights are exact (unlike lucidrains/titans-pytorch, which by
default takes all chunks' gradients at the call's start weights).

With ``max_grad_norm`` each token's gradient (all layers together) is clipped to that
norm, i.e. ``theta_t`` is scaled by ``min(1, max_grad_norm / ||grad_t||)``. Without it a
memory whose own retrievals feed its next targets (MAC) can blow up within one
sequence: weights 1e14 by token 200 of a 256-token row after 52 training steps.

Within a chunk the state is affine in (M_0, S_0, grad_1..grad_C):

    [M_t; S_t] = Phi_t [M_0; S_0] + sum_{s<=t} [c_{t,s}; d_{t,s}] grad_s,
    Phi_t = prod_{r<=t} [[1 - alpha_r, eta_r], [0, eta_r]],

i.e. the recurrence on the pair is ``[M_t; S_t] = [[1 - alpha_t, eta_t], [0, eta_t]] [M_{t-1}; S_{t-1}]
- theta_t [grad_t; grad_t]``, and all scalar coefficients come from one
``jax.lax.associative_scan`` over these affine maps. Each
per-token gradient of an MLP layer is an outer product ``delta_s a_s^T``, so the
outputs ``M_t(q_t)`` and the chunk-end state are batched matmuls (the "dual form"):
no per-token weights are ever materialised. Chunks run in a ``lax.scan``, so
activation memory is O(chunk_size) and the state is constant in the sequence length.

Chunk size is the knob trading exactness of online learning (1 = fully online
gradient descent) against parallelism (larger chunks = bigger matmuls, fewer
sequential steps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lca.memory import mlp


class MemoryTokens(NamedTuple):
    """One (batch row, head) stream: ``q, k [t, d_in]``, ``v [t, d_out]``, gates ``[t]``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr: jax.Array  # theta_t
    momentum: jax.Array  # eta_t
    forget: jax.Array  # alpha_t


def _compose(earlier, later):
    """Compose two affine maps ``x -> A x + B`` (A [..,2,2], B [..,2,C]): later after earlier."""
    a1, b1 = earlier
    a2, b2 = later
    return jnp.einsum("...ij,...jk->...ik", a2, a1), jnp.einsum("...ij,...jk->...ik", a2, b1) + b2


def chunk_coefficients(lr: jax.Array, momentum: jax.Array, forget: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scalar transfer of one chunk of ``c`` tokens.

    Returns ``phi [c, 2, 2]`` (state after token t from the chunk-start (M_0, S_0)) and
    ``coef [c, 2, c]`` (weight of grad_s in M_t: ``coef[t, 0, s]``, in S_t: ``coef[t, 1, s]``;
    zero for s > t).
    """
    c = lr.shape[0]
    zero = jnp.zeros_like(lr)
    step = jnp.stack(
        [jnp.stack([1.0 - forget, momentum], -1), jnp.stack([zero, momentum], -1)], -2
    )  # [c, 2, 2]
    push = -lr[:, None, None] * jnp.eye(c, dtype=lr.dtype)[:, None, :]  # [c, 1, c]
    push = jnp.broadcast_to(push, (c, 2, c))
    return jax.lax.associative_scan(_compose, (step, push))


def _state_after(weights, momentum, inputs, deltas, phi_t, coef_t):
    """(M_t, S_t) from the chunk-start state and one row of the chunk's coefficients."""
    new_w, new_s = [], []
    for w, s, a, d in zip(weights, momentum, inputs, deltas, strict=True):
        new_w.append(phi_t[0, 0] * w + phi_t[0, 1] * s + (d * coef_t[0][:, None]).T @ a)
        new_s.append(phi_t[1, 1] * s + (d * coef_t[1][:, None]).T @ a)
    return tuple(new_w), tuple(new_s)


def chunk_step(weights, momentum, chunk: MemoryTokens, act, *, row=None, max_grad_norm=None):
    """One chunk: outputs ``y [c, d_out]`` and the state after token ``row`` (default: last).

    ``row`` may be traced; ``row = -1`` gives back the chunk-start state. ``max_grad_norm``: None, or
    the norm each token's gradient is clipped to.
    """
    inputs, deltas = mlp.activations_and_deltas(weights, chunk.k, chunk.v, act)
    lr = chunk.lr * mlp.clip_factor(mlp.grad_sq_norms(inputs, deltas), max_grad_norm)
    phi, coef = chunk_coefficients(lr, chunk.momentum, chunk.forget)

    h = chunk.q
    for i, (w, s, a, d) in enumerate(zip(weights, momentum, inputs, deltas, strict=True)):
        z = phi[:, 0, 0, None] * (h @ w.T) + phi[:, 0, 1, None] * (h @ s.T) + (coef[:, 0, :] * (h @ a.T)) @ d
        h = act(z) if i < len(weights) - 1 else z

    if row is None:
        return h, _state_after(weights, momentum, inputs, deltas, phi[-1], coef[-1])
    safe = jnp.maximum(row, 0)
    after = _state_after(weights, momentum, inputs, deltas, phi[safe], coef[safe])
    before = (weights, momentum)
    return h, jax.tree.map(lambda x, y: jnp.where(row < 0, y, x), after, before)


def memorize_chunked(weights, momentum, tokens: MemoryTokens, *, chunk_size: int, act, stop, max_grad_norm=None):
    """Stream ``t`` tokens (``t`` a multiple of ``chunk_size``) through the memory.

    Returns ``(y [t, d_out], (weights, momentum) at the start of chunk ``stop``)``;
    ``stop`` (may be traced) in ``[0, t // chunk_size]``, the last value meaning the end.
    ``max_grad_norm`` as in :func:`chunk_step`.
    """
    t = tokens.q.shape[0]
    n = t // chunk_size
    chunks = jax.tree.map(lambda x: x.reshape((n, chunk_size) + x.shape[1:]), tokens)

    def body(carry, xs):
        state, saved = carry
        index, chunk = xs
        saved = jax.tree.map(lambda s, x: jnp.where(index == stop, x, s), saved, state)
        y, state = chunk_step(*state, chunk, act, max_grad_norm=max_grad_norm)
        return (state, saved), y

    start = (weights, momentum)
    (end, saved), ys = jax.lax.scan(body, (start, start), (jnp.arange(n), chunks))
    saved = jax.tree.map(lambda s, e: jnp.where(stop == n, e, s), saved, end)
    return ys.reshape((t,) + ys.shape[2:]), saved
