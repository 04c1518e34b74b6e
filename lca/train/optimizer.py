"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

from __future__ import annotations

import jax
import optax

from lca.config import TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """0 -> ``lr`` over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio`` at ``steps``."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices only: norms' scales (1-d) are not decayed."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
        ),
    )
