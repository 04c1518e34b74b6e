"""The loss and the jitted train step.

The train state is a plain pytree ``{"params", "opt_state", "step", "rng"}`` so
that Orbax, optax and the sharding rules all see the same structure. A step takes
a batch shaped ``[grad_accum, micro_batch, seq_len]``, sums masked token losses
and gradients over the micro-batches (``lax.scan``) and divides by the total
token count, so accumulation gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def make_logits_fn(graphdef) -> Callable:
    """``logits_fn(params, batch) -> float32 [b, l, vocab]``."""

    def logits_fn(params, batch):
        model = nnx.merge(graphdef, params)
        return model(batch["inputs"], batch["positions"], batch["segment_ids"])

    return logits_fn


def token_losses(logits, batch):
    """``(sum of masked cross-entropy in nats, number of counted tokens)``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    """``step(state, batch) -> (state, metrics)``; batch leaves are ``[accum, micro, len]``."""
    logits_fn = make_logits_fn(graphdef)

    def loss_sum(params, micro):
        return token_losses(logits_fn(params, micro), micro)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch):
        params = state["params"]

        def accumulate(carry, micro):
            grads, loss, count = carry
            (micro_loss, micro_count), micro_grads = grad_fn(params, micro)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, loss + micro_loss, count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "tokens": count,
        }
        return new_state, metrics

    return step
