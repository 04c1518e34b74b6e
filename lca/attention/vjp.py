"""One custom VJP for every attention built from a (forward, backward) pair.

Blockwise attention, the ring and Ulysses' local step all save the output and
its log-sum-exp in the forward and recompute from them in the backward
(FlashAttention-2); this module wires such a pair into ``jax.custom_vjp`` once.

The VJP uses JAX's symbolic zeros, so a backward learns *statically* whether the
lse has a cotangent at all: when the caller never differentiates through the lse
(the usual case), ``backward`` receives ``dlse=None`` rather than an array of
zeros. Steps whose kernels take no lse cotangent (cuDNN's, ``lca.attention.cudnn``)
then run their plain backward, decided at trace time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values


def attention_vjp(forward, backward):
    """``f(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out in q.dtype, lse)`` with a custom VJP.

    ``forward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out f32, lse)``;
    ``backward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse)
    -> (dq, dk, dv)`` from the saved output and lse (positions and segments get
    no gradient). ``dlse`` is None when the lse has no cotangent; ``dout`` is
    always an array (zeros when only the lse is differentiated).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        out, lse = forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return out.astype(q.dtype), lse

    def fwd(st, *primals):
        primals = custom_vjp_primal_tree_values(primals)
        out, lse = attention(st, *primals)
        return (out, lse), (*primals, out, lse)

    def bwd(st, residuals, cotangents):
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
        dout, dlse = cotangents
        if isinstance(dout, SymbolicZero):
            dout = jnp.zeros_like(out)  # like out: keeps its sharding and varying axes
        if isinstance(dlse, SymbolicZero):
            dlse = None
        dq, dk, dv = backward(st, *residuals, dout, dlse)
        no_grad = jax.tree.map(lambda _: None, (q_pos, kv_pos, q_seg, kv_seg))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad)

    attention.defvjp(fwd, bwd, symbolic_zeros=True)
    # Staged through jit: an eagerly run jax.shard_map cannot call a custom_vjp with
    # symbolic zeros directly (NotImplementedError in jax 0.10/0.11), a jitted one it can.
    return jax.jit(attention, static_argnums=0)
