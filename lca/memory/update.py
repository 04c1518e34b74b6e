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

Restarts (packed documents): a token flagged ``restart`` finds the memory at a given
restart state ``(M_R, S_R)`` instead of its predecessor's, so nothing of the earlier
documents reaches it. Its own gradient and those of the tokens after it in the same
chunk are taken at ``M_R`` (the new document's start weights, as a chunk start's are),
and the affine maps gain the columns of ``(M_R, S_R)``: a restart token's map is
``x -> K_t [M_R; S_R] - theta_t [grad_t; grad_t]``, i.e. zero on the incoming state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lca.memory import mlp
from lca.parallel.vma import varying_like


class MemoryTokens(NamedTuple):
    """One (batch row, head) stream: ``q, k [t, d_in]``, ``v [t, d_out]``, gates ``[t]``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr: jax.Array  # theta_t
    momentum: jax.Array  # eta_t
    forget: jax.Array  # alpha_t
    # bool [t]: the memory restarts before this token (a new packed document); None: never
    restart: jax.Array | None = None


def _compose(earlier, later):
    """Compose two affine maps ``x -> A x + B`` (A [..,2,2], B [..,2,C]): later after earlier."""
    a1, b1 = earlier
    a2, b2 = later
    return jnp.einsum("...ij,...jk->...ik", a2, a1), jnp.einsum("...ij,...jk->...ik", a2, b1) + b2


def chunk_coefficients(
    lr: jax.Array, momentum: jax.Array, forget: jax.Array, restart: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Scalar transfer of one chunk of ``c`` tokens.

    Returns ``phi [c, 2, 2]`` (state after token t from the chunk-start (M_0, S_0)),
    ``coef [c, 2, c]`` (weight of grad_s in M_t: ``coef[t, 0, s]``, in S_t: ``coef[t, 1, s]``;
    zero for s > t) and, with ``restart [c]`` (bool), ``from_restart [c, 2, 2]``: the state
    after token t from the restart state (M_R, S_R); None without ``restart``.
    """
    c = lr.shape[0]
    zero = jnp.zeros_like(lr)
    step = jnp.stack(
        [jnp.stack([1.0 - forget, momentum], -1), jnp.stack([zero, momentum], -1)], -2
    )  # [c, 2, 2]
    push = -lr[:, None, None] * jnp.eye(c, dtype=lr.dtype)[:, None, :]  # [c, 1, c]
    push = jnp.broadcast_to(push, (c, 2, c))
    if restart is None:
        return (*jax.lax.associative_scan(_compose, (step, push)), None)
    # a restart token maps any incoming state to K_t (M_R, S_R): the restart state is two more columns
    flag = restart[:, None, None]
    transfer, constant = jax.lax.associative_scan(
        _compose, (jnp.where(flag, 0.0, step), jnp.concatenate([jnp.where(flag, step, 0.0), push], -1))
    )
    return transfer, constant[..., 2:], constant[..., :2]


def _state_after(weights, momentum, inputs, deltas, phi_t, coef_t, start=None, from_start_t=None):
    """(M_t, S_t) from the chunk-start state and one row of the chunk's coefficients (and of the
    restart state's, when ``start`` is given)."""
    new_w, new_s = [], []
    for i, (w, s, a, d) in enumerate(zip(weights, momentum, inputs, deltas, strict=True)):
        m_t = phi_t[0, 0] * w + phi_t[0, 1] * s + (d * coef_t[0][:, None]).T @ a
        s_t = phi_t[1, 1] * s + (d * coef_t[1][:, None]).T @ a
        if start is not None:
            w_r, s_r = start[0][i], start[1][i]
            m_t = m_t + from_start_t[0, 0] * w_r + from_start_t[0, 1] * s_r
            s_t = s_t + from_start_t[1, 1] * s_r
        new_w.append(m_t)
        new_s.append(s_t)
    return tuple(new_w), tuple(new_s)


def _gradient_factors(weights, chunk: MemoryTokens, act, start):
    """Every token's layer inputs and output-gradients (:func:`mlp.activations_and_deltas`), taken at the
    chunk-start ``weights``, or at the restart weights ``start[0]`` from a restart in the chunk on."""
    inputs, deltas = mlp.activations_and_deltas(weights, chunk.k, chunk.v, act)
    if start is None:
        return inputs, deltas
    at_start = mlp.activations_and_deltas(start[0], chunk.k, chunk.v, act)
    restarted = (jnp.cumsum(chunk.restart.astype(jnp.int32)) > 0)[:, None]
    pick = lambda a, b: [jnp.where(restarted, y, x) for x, y in zip(a, b, strict=True)]  # noqa: E731
    return pick(inputs, at_start[0]), pick(deltas, at_start[1])


def chunk_step(weights, momentum, chunk: MemoryTokens, act, *, row=None, max_grad_norm=None, start=None):
    """One chunk: outputs ``y [c, d_out]`` and the state after token ``row`` (default: last).

    ``row`` may be traced; ``row = -1`` gives back the chunk-start state. ``max_grad_norm``: None, or
    the norm each token's gradient is clipped to. ``start``: the restart state ``(weights, momentum)``
    that tokens flagged ``chunk.restart`` return to; without it (or without flags) no token restarts.
    """
    if chunk.restart is None:
        start = None
    inputs, deltas = _gradient_factors(weights, chunk, act, start)
    lr = chunk.lr * mlp.clip_factor(mlp.grad_sq_norms(inputs, deltas), max_grad_norm)
    phi, coef, from_start = chunk_coefficients(lr, chunk.momentum, chunk.forget,
                                               None if start is None else chunk.restart)

    h = chunk.q
    for i, (w, s, a, d) in enumerate(zip(weights, momentum, inputs, deltas, strict=True)):
        z = phi[:, 0, 0, None] * (h @ w.T) + phi[:, 0, 1, None] * (h @ s.T) + (coef[:, 0, :] * (h @ a.T)) @ d
        if start is not None:
            z = z + from_start[:, 0, 0, None] * (h @ start[0][i].T) + from_start[:, 0, 1, None] * (h @ start[1][i].T)
        h = act(z) if i < len(weights) - 1 else z

    def state_at(t):
        return _state_after(weights, momentum, inputs, deltas, phi[t], coef[t], start,
                            None if start is None else from_start[t])

    if row is None:
        return h, state_at(-1)
    after = state_at(jnp.maximum(row, 0))
    before = (weights, momentum)
    return h, jax.tree.map(lambda x, y: jnp.where(row < 0, y, x), after, before)


def memorize_chunked(weights, momentum, tokens: MemoryTokens, *, chunk_size: int, act, stop, max_grad_norm=None,
                     start=None, busy=None):
    """Stream ``t`` tokens (``t`` a multiple of ``chunk_size``) through the memory.

    Returns ``(y [t, d_out], (weights, momentum) at the start of chunk ``stop``)``;
    ``stop`` (may be traced) in ``[0, t // chunk_size]``, the last value meaning the end.
    ``max_grad_norm`` and ``start`` (the restart state) as in :func:`chunk_step`. ``busy [t // chunk_size]``
    (bool, optional): the chunks that may hold a restart; the others skip the restart terms, which take
    each gradient twice. Left unbatched under ``vmap`` (the same for every stream) it stays a branch.

    Every chunk's update is rematerialised (``jax.checkpoint``): the backward keeps only each chunk's
    start state and recomputes the chunk's c x c terms and per-token gradient factors. Keeping them
    instead cost more than recomputing on CPU (benchmarks/titans_update.py, 16 streams x 4,096 tokens,
    chunk 16: 1.9x the time and 4x the peak memory of the fwd+bwd). The ``cond`` sits in a checkpoint
    of its own too: a differentiated ``cond`` keeps the residuals of both branches, the restart state
    among them, and the scan stacked that loop-invariant state once per chunk (same shape, 2% of the
    chunks holding a restart: 1.8x the peak of the unpacked fwd+bwd, against 1.01x now).
    """
    t = tokens.q.shape[0]
    n = t // chunk_size
    chunks = jax.tree.map(lambda x: x.reshape((n, chunk_size) + x.shape[1:]), tokens)

    def update(start):
        return jax.checkpoint(
            lambda state, chunk: chunk_step(*state, chunk, act, max_grad_norm=max_grad_norm, start=start))

    def either(state, chunk, restarts_here):
        return jax.lax.cond(restarts_here, update(start), update(None), state, chunk)

    def body(carry, xs):
        state, saved = carry
        index, chunk, restarts_here = xs  # restarts_here: None without busy
        saved = jax.tree.map(lambda s, x: jnp.where(index == stop, x, s), saved, state)
        if start is None or busy is None:
            y, state = update(start)(state, chunk)
        else:
            y, state = jax.checkpoint(either)(state, chunk, restarts_here)
        return (state, saved), y

    if start is not None:
        # Inside shard_map: a restart state the same on every device (from replicated params) would turn
        # varying inside the branch, and its gradient's psum with it: a collective only the devices
        # taking the branch reach (they hung). Turn it varying here, outside the cond.
        start = varying_like(start, weights, momentum, tokens)
    begin = (weights, momentum)
    (end, saved), ys = jax.lax.scan(body, (begin, begin), (jnp.arange(n), chunks, busy))
    saved = jax.tree.map(lambda s, e: jnp.where(stop == n, e, s), saved, end)
    return ys.reshape((t,) + ys.shape[2:]), saved
