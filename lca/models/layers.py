"""The two parameterised layers every model module uses, dense and RMSNorm, and the token lookup.

Parameters are created in ``cfg.param_dtype`` (float32 by default) with logical
axis names (``nnx.with_partitioning``) that ``rules`` map to mesh axes; compute
runs in ``cfg.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lca.config import ModelConfig


def dense(rngs, d_in: int, d_out: int, names: tuple[str, str], cfg: ModelConfig, scale: float = 1.0):
    """A bias-free ``nnx.Linear`` with variance-scaling init and logical axes ``names``."""
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(
        d_in, d_out, use_bias=False, kernel_init=nnx.with_partitioning(init, names),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
    )


def rms_norm(rngs, cfg: ModelConfig):
    return nnx.RMSNorm(
        cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)), rngs=rngs,
    )


# Up to this vocabulary size the embedding table's gradient is a one-hot matmul. jnp.take's
# gradient is a scatter-add, and on a GPU a small table's rows collide: with the byte vocabulary
# it took 48.7 ms, 9% of the 104M model's 32k-token training step on an H100
# (benchmarks/results/train_gpu_nvidia_h100_80gb_hbm3_ops.md, input_scatter_fusion). Above it the
# one-hot operand, tokens x vocab, would cost more than the collisions do.
ONE_HOT_GRAD_VOCAB = 4096


def embed_tokens(table, tokens):
    """``table[tokens]``: ``table [vocab, d]``, ``tokens [...]`` integers -> ``[..., d]`` in table's dtype.

    The same values as ``jnp.take(table, tokens, axis=0)``. Its gradient with respect to
    ``table`` is a one-hot matmul accumulated in float32 for vocabularies up to
    :data:`ONE_HOT_GRAD_VOCAB`, and jnp.take's scatter-add above that.
    """
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype} of shape {tokens.shape}.")
    if table.shape[0] > ONE_HOT_GRAD_VOCAB:
        return jnp.take(table, tokens, axis=0)
    return _take_with_one_hot_grad(table, tokens)


@jax.custom_vjp
def _take_with_one_hot_grad(table, tokens):
    return jnp.take(table, tokens, axis=0)


def _take_forward(table, tokens):
    # The table is a parameter, alive anyway: keeping it costs nothing and gives the backward its shape.
    return jnp.take(table, tokens, axis=0), (table, tokens)


def _take_backward(residuals, g):
    table, tokens = residuals
    one_hot = jax.nn.one_hot(tokens, table.shape[0], dtype=g.dtype)
    dtable = jnp.einsum("...v,...d->vd", one_hot, g, preferred_element_type=jnp.float32)
    return dtable.astype(table.dtype), None


_take_with_one_hot_grad.defvjp(_take_forward, _take_backward)
