"""The Titans LMM (memory alone) as a model token mixer (``titans_lmm``), its config section,
and the bridge from functional params to NNX.

A mixer is called as ``mixer(x [b, l, d_model], positions [b, l], segment_ids [b, l]) -> [b, l, d_model]``.
Each call is one whole sequence: it starts from :func:`fresh_state` (the learned initial
memory after the persistent tokens), so the memory's test-time learning never leaks
between training steps. Positions are not used: the recurrence orders the tokens.
``segment_ids`` (packed rows): the memory restarts at every document start, so it never
carries one document into the next (:mod:`lca.memory.neural_memory`).

When the model's sequence strategy splits the sequence over a mesh axis
(``MixerEnv.sequence_axis``), the memory runs pipelined over that axis
(:func:`lca.memory.context_parallel.fresh_memory`): the same result as on one device.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lca.config import ConfigError, ModelConfig, choice_error
from lca.memory.context_parallel import ContextSplit, fresh_memory
from lca.memory.neural_memory import (ACTIVATIONS, INIT_FORGET, MAX_GRAD_NORM, MemoryConfig, MemoryState, fresh_state,
                                       init_params, memory_layer, param_axes)
from lca.parallel.sharding import logical_to_spec

if TYPE_CHECKING:
    from lca.models.mixers import MixerEnv


@dataclasses.dataclass(frozen=True)
class TitansLmmConfig:
    """``model.mixers.titans_lmm``: the neural memory (:class:`MemoryConfig`) of one layer."""

    memory_heads: int = 1  # independent memory MLPs, each over d_model / memory_heads features
    depth: int = 2  # layers of each memory MLP (1: linear memory)
    expansion: int = 2  # hidden width of the memory MLP / its input width
    chunk_size: int = 16  # tokens whose gradients share the chunk-start weights (1: fully online)
    conv_kernel: int = 4  # causal depthwise conv after the q/k/v projections (0: none)
    persistent: int = 0  # learned persistent memory tokens the memory sees first
    # upper bound of the data-dependent learning rate theta; 0.1 and 0.01 diverged in training at chunk 16
    # (benchmarks/titans_eval.py), see MemoryConfig
    max_lr: float = 0.003
    # each token's memory gradient is clipped to this norm (null: no clipping); without it MAC's memory
    # blew up to inf within one row after 52 training steps (benchmarks/titans_eval.py), see MemoryConfig
    max_grad_norm: Optional[float] = MAX_GRAD_NORM
    activation: str = "silu"  # of the memory MLP: silu | gelu | tanh
    # forgetting rate alpha per token at initialisation: a fresh memory reaches back about 1 / init_forget tokens;
    # 0.05 decayed a fresh memory's weights to ~0 within 2k tokens and MAG never learned the passkey (MemoryConfig)
    init_forget: float = INIT_FORGET
    micro_batches: int = 1  # on a context-split mesh: pipeline micro-batches per device's rows

    def memory(self, d_model: int) -> MemoryConfig:
        return MemoryConfig(
            d_model=d_model, num_heads=self.memory_heads, depth=self.depth, expansion=self.expansion,
            chunk_size=self.chunk_size, conv_kernel=self.conv_kernel, num_persistent=self.persistent,
            max_lr=self.max_lr, max_grad_norm=self.max_grad_norm, activation=self.activation,
            init_forget=self.init_forget,
        )

    def check(self, key: str, model: ModelConfig) -> None:
        for name in ("memory_heads", "depth", "expansion", "chunk_size", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{key}.{name}' must be an int >= 1, got {getattr(self, name)!r}.")
        for name in ("conv_kernel", "persistent"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{key}.{name}' must be an int >= 0, got {getattr(self, name)!r}.")
        if not self.max_lr > 0:
            raise ConfigError(f"config key '{key}.max_lr' must be > 0, got {self.max_lr!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"config key '{key}.max_grad_norm' must be > 0 or null (no clipping), "
                              f"got {self.max_grad_norm!r}.")
        if not 0 < self.init_forget < 1:
            raise ConfigError(f"config key '{key}.init_forget' must be in (0, 1) (a sigmoid's value), "
                              f"got {self.init_forget!r}.")
        if self.activation not in ACTIVATIONS:
            raise choice_error(f"{key}.activation", self.activation, list(ACTIVATIONS))
        if model.d_model % self.memory_heads:
            raise ConfigError(
                f"config key '{key}.memory_heads' ({self.memory_heads}) must divide model.d_model ({model.d_model})."
            )


def as_variables(tree, axes):
    """Functional params (nested dicts / tuples of arrays) -> NNX containers of ``nnx.Param``.

    ``axes``: the same tree with each array's logical axis names (a tuple per array), so the
    rules shard these params as they do ``lca.models``' own (``nnx.with_partitioning``).
    """
    if isinstance(tree, dict):
        return nnx.Dict({k: as_variables(v, axes[k]) for k, v in tree.items()})
    if isinstance(tree, (tuple, list)):
        return nnx.List([as_variables(v, a) for v, a in zip(tree, axes, strict=True)])
    if tree.ndim != len(axes):
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {tree.shape}")
    # names only: the arrays exist already (the model build places them by these names), and a
    # mixer built on its own, without a mesh, must still work
    return nnx.Param(tree, out_sharding=tuple(axes), eager_sharding=False)


def as_arrays(node):
    """The inverse of :func:`as_variables`: the functional params of the current values."""
    if isinstance(node, nnx.Dict):
        return {k: as_arrays(v) for k, v in node.items()}
    if isinstance(node, nnx.List):
        return tuple(as_arrays(v) for v in node)
    return node[...]


class ContextPlacement:
    """Decides, per call, where the memory of a mixer runs: one device, or pipelined over a mesh axis."""

    def __init__(self, env: MixerEnv, micro_batches: int):
        self.mesh, self.axis, self.micro_batches = env.mesh, env.sequence_axis(), micro_batches
        self.batch_rules = {"batch": [a for a in env.shard.rules.get("batch", ()) if a != self.axis]}

    def __call__(self, x: jax.Array) -> ContextSplit | None:
        if self.axis is None:
            return None
        # the rows go over the batch axes that divide this batch (as the activations' rules do)
        spec = logical_to_spec(("batch",), self.batch_rules, self.mesh, x.shape[:1])[0]
        batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return ContextSplit(self.mesh, self.axis, batch_axes, self.micro_batches)


class MemoryMixer(nnx.Module):
    """Neural long-term memory layer with the mixer call signature (Titans "LMM")."""

    def __init__(self, cfg: TitansLmmConfig, env: MixerEnv, *, rngs: nnx.Rngs):
        self.config = cfg.memory(env.model.d_model)
        self.place = ContextPlacement(env, cfg.micro_batches)
        self.parameters = as_variables(init_params(rngs.params(), self.config), param_axes(self.config))

    def __call__(self, x: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        del positions  # see module docstring
        params = as_arrays(self.parameters)
        y = fresh_memory(params, x.astype(jnp.float32), config=self.config, split=self.place(x),
                         segment_ids=segment_ids)
        return y.astype(x.dtype)

    def start_cache(self, batch: int, max_len: int, dtype) -> MemoryState:
        """The memory's state after its persistent tokens (inference, :mod:`lca.models.generate`): a fixed
        size whatever ``max_len``, float32 whatever ``dtype``."""
        del max_len, dtype
        return fresh_state(as_arrays(self.parameters), self.config, batch)

    def extend(self, x, positions, cache: MemoryState):
        """Stream the next ``t`` tokens ``x [b, t, d_model]`` -> ``(out [b, t, d_model], state)``: the chunk
        grid counts from the first token, so streaming equals one call over the whole sequence."""
        del positions
        y, state = memory_layer(as_arrays(self.parameters), cache, x.astype(jnp.float32), config=self.config)
        return y.astype(x.dtype), state
