"""Token-by-token oracle of the Titans memory update, for tests and benchmarks.

A plain ``lax.scan`` over tokens with the same semantics as
:func:`lca.memory.update.memorize_chunked`: every gradient is ``jax.grad`` of
``||M(k_t) - v_t||^2`` at the weights of the start of the token's chunk, then
``S_t = eta_t S_{t-1} - theta_t grad_t``, ``M_t = (1 - alpha_t) M_{t-1} + S_t`` and
``y_t = M_t(q_t)``; with ``max_grad_norm``, ``grad_t`` clipped to that norm first. A token
flagged ``restart`` (with ``start`` given) first sets ``(M, S)`` to ``start`` and takes its
own and the rest of its chunk's gradients there. It shares nothing with the chunk-parallel
path but the MLP and the clipping formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.memory import mlp
from lca.memory.update import MemoryTokens


def memorize_sequential(weights, momentum, tokens: MemoryTokens, *, chunk_size: int, act, stop, max_grad_norm=None,
                        start=None, busy=None):
    """Same contract as :func:`lca.memory.update.memorize_chunked`, one token per step (``busy``, a shortcut
    there, is not needed)."""
    del busy
    if tokens.restart is None or start is None:
        start, tokens = None, tokens._replace(restart=jnp.zeros(tokens.lr.shape, bool))
    t = tokens.q.shape[0]
    stop_token = stop * chunk_size
    grad_fn = jax.grad(lambda w, k, v: mlp.loss(w, k[None], v[None], act))

    def body(carry, xs):
        anchor, w, s, saved = carry
        index, tok = xs
        saved = jax.tree.map(lambda old, x: jnp.where(index == stop_token, x, old), saved, (w, s))
        if start is not None:
            w, s = jax.tree.map(lambda x, r: jnp.where(tok.restart, r, x), (w, s), start)
        # the gradients of a chunk, or of its tokens from a restart on, are taken where it (re)started
        anchor = jax.tree.map(lambda a, x: jnp.where((index % chunk_size == 0) | tok.restart, x, a), anchor, w)
        g = grad_fn(anchor, tok.k, tok.v)
        lr = tok.lr * mlp.clip_factor(sum(jnp.sum(g_ * g_) for g_ in g), max_grad_norm)
        s = jax.tree.map(lambda s_, g_: tok.momentum * s_ - lr * g_, s, g)
        w = jax.tree.map(lambda w_, s_: (1.0 - tok.forget) * w_ + s_, w, s)
        return (anchor, w, s, saved), mlp.apply(w, tok.q, act)

    init = (weights, weights, momentum, (weights, momentum))
    (_, w, s, saved), ys = jax.lax.scan(body, init, (jnp.arange(t), tokens))
    saved = jax.tree.map(lambda old, e: jnp.where(stop_token == t, e, old), saved, (w, s))
    return ys, saved
