"""The Titans LMM (memory alone) as a model token mixer, and the bridge from functional params to NNX.

A mixer is called as ``mixer(x [b, l, d_model], positions [b, l], segment_ids [b, l]) -> [b, l, d_model]``.
Each call is one whole sequence: it starts from :func:`fresh_state` (the learned initial
memory after the persistent tokens), so the memory's test-time learning never leaks
between training steps. Positions are not used: the recurrence orders the tokens.
``segment_ids`` must be one document per row (packing is not supported yet); it is
accepted for the mixer signature.
"""

from __future__ import annotations

import jax
from flax import nnx

from lca.memory.neural_memory import MemoryConfig, fresh_state, init_params, memory_layer


def as_variables(tree):
    """Functional params (nested dicts / tuples of arrays) -> NNX containers of ``nnx.Param``."""
    if isinstance(tree, dict):
        return nnx.Dict({k: as_variables(v) for k, v in tree.items()})
    if isinstance(tree, (tuple, list)):
        return nnx.List([as_variables(v) for v in tree])
    return nnx.Param(tree)


def as_arrays(node):
    """The inverse of :func:`as_variables`: the functional params of the current values."""
    if isinstance(node, nnx.Dict):
        return {k: as_arrays(v) for k, v in node.items()}
    if isinstance(node, nnx.List):
        return tuple(as_arrays(v) for v in node)
    return node[...]


class MemoryMixer(nnx.Module):
    """Neural long-term memory layer with the mixer call signature (Titans "LMM")."""

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.parameters = as_variables(init_params(rngs.params(), config))

    def __call__(self, x: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        del positions, segment_ids  # see module docstring
        params = as_arrays(self.parameters)
        return memory_layer(params, fresh_state(params, self.config, x.shape[0]), x, config=self.config)[0]
