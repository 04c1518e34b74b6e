"""One custom VJP for every attention built from a (forward, backward) pair.

Blockwise attention, the ring and Ulysses' local step all save the output and
its log-sum-exp in the forward and recompute from them in the backward
(FlashAttention-2); this module wires such a pair into ``jax.custom_vjp`` once.
"""

from __future__ import annotations

import functools

import jax


def attention_vjp(forward, backward):
    """``f(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out in q.dtype, lse)`` with a custom VJP.

    ``forward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out f32, lse)``;
    ``backward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)
    -> (dq, dk, dv)`` from the saved output and lse (positions and segments get
    no gradient).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        out, lse = forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return out.astype(q.dtype), lse

    def fwd(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        out, lse = attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)

    def bwd(st, residuals, cotangents):
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
        dq, dk, dv = backward(st, *residuals, *cotangents)
        no_grad = jax.tree.map(lambda _: None, (q_pos, kv_pos, q_seg, kv_seg))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad)

    attention.defvjp(fwd, bwd)
    return attention
