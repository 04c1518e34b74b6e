"""How raw ``q . k`` scores become logits, shared by every implementation."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LogitOptions:
    """``softcap(scale * q . k)``: the scale, then an optional tanh soft cap.

    Hashable and static (a ``custom_vjp`` non-differentiable argument). Built and
    validated from user options by :func:`lca.attention.inputs.logit_options`.
    """

    scale: float
    softcap: float | None = None

    def apply(self, scores):
        logits = scores * self.scale
        if self.softcap is not None:
            logits = self.softcap * jnp.tanh(logits / self.softcap)
        return logits
