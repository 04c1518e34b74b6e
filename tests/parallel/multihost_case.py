"""The computation the multi-host test runs both as 2 processes x 4 devices and as 1 x 8."""

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import reference_attention, ring_attention, ulysses_attention
from lca.parallel import make_mesh

SHAPE = dict(batch=2, length=64, heads=8, kv_heads=2, head_dim=8)


def case_inputs():
    rng = np.random.default_rng(0)
    b, t, h, hk, d = (SHAPE[k] for k in ("batch", "length", "heads", "kv_heads", "head_dim"))
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hk, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hk, d)).astype(np.float32)
    seg = np.repeat((np.arange(t) >= 23).astype(np.int32)[None], b, 0)  # crosses a shard
    w = rng.standard_normal((b, t, h, d)).astype(np.float32)
    return q, k, v, seg, w


def run_case(to_global):
    """Ring (out, lse, dq, dk, dv) and Ulysses (out, lse) over all devices on one context axis.

    ``to_global(numpy_array, mesh)`` builds a global array sharded over "context".
    """
    mesh = make_mesh(context=-1)
    q, k, v, seg, w = (to_global(x, mesh) for x in case_inputs())
    # Global arrays are arguments, never closed over: a multi-process array cannot be a constant.
    kwargs = dict(mesh=mesh, causal=True, return_lse=True)

    def ring_loss(q, k, v, seg, w):
        out, lse = ring_attention(q, k, v, segment_ids=seg, block_q=4, block_kv=4, **kwargs)
        return jnp.sum(out * w) + jnp.sum(jnp.sin(lse)), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = jax.jit(
        jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True)
    )(q, k, v, seg, w)
    u_out, u_lse = jax.jit(
        lambda q, k, v, seg: ulysses_attention(q, k, v, segment_ids=seg, **kwargs)
    )(q, k, v, seg)
    return dict(ring_out=out, ring_lse=lse, ring_dq=dq, ring_dk=dk, ring_dv=dv,
                ulysses_out=u_out, ulysses_lse=u_lse)


def oracle_case():
    """The same quantities from the dense oracle on one device."""
    q, k, v, seg, w = (jnp.asarray(x) for x in case_inputs())

    def loss(q, k, v):
        out, lse = reference_attention(q, k, v, causal=True, segment_ids=seg, return_lse=True)
        return jnp.sum(out * w) + jnp.sum(jnp.sin(lse)), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return dict(ring_out=out, ring_lse=lse, ring_dq=dq, ring_dk=dk, ring_dv=dv,
                ulysses_out=out, ulysses_lse=lse)
