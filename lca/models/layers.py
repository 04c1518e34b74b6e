"""The two parameterised layers every model module uses: dense and RMSNorm.

Parameters are created in ``cfg.param_dtype`` (float32 by default) with logical
axis names (``nnx.with_partitioning``) that ``rules`` map to mesh axes; compute
runs in ``cfg.dtype``.
"""

from __future__ import annotations

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
