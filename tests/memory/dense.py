"""Shared checks for the Titans architectures: the dense attention oracle (every mask written
out) and the gradients of a mixer."""

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from lca.models.rope import apply_rope


def dense_attention_branch(params, x, positions, config):
    """[P || x] attention written out: P visible to all, x causal within the window."""
    h = config.num_heads
    split = lambda z: (rearrange(t, "b l (h d) -> b l h d", h=h) for t in jnp.split(z, 3, -1))  # noqa: E731
    q, k, v = split(x @ params["w_qkv"])
    q, k = apply_rope(q, positions, config.rope_theta), apply_rope(k, positions, config.rope_theta)
    p = params["memory"]["persistent"]
    _, pk, pv = split(jnp.broadcast_to(p, (x.shape[0],) + p.shape) @ params["w_qkv"])
    keys, values = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / jnp.sqrt(q.shape[-1])
    i, j = jnp.arange(x.shape[1])[:, None], jnp.arange(x.shape[1])[None]
    seq_visible = (j <= i) & (i - j < config.window)
    visible = jnp.concatenate([jnp.ones((x.shape[1], p.shape[0]), bool), seq_visible], 1)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), -1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values)
    return rearrange(out, "b l h d -> b l (h d)") @ params["w_out"]


def assert_gradients_reach_every_parameter(mixer, x, positions, count: int):
    """``mixer``'s ``count`` parameters all get finite, non-zero gradients."""
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, positions, None) ** 2)))(mixer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == count
    for g in leaves:
        assert np.all(np.isfinite(g)) and np.any(g != 0)
