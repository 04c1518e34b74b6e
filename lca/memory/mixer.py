"""The Titans LMM (memory alone) as a model token mixer: an ``nnx.Module`` around :func:`memory_layer`.

Called as ``mixer(x [b, l, d_model], positions [b, l], segment_ids [b, l]) -> [b, l, d_model]``.
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


class MemoryMixer(nnx.Module):
    """Neural long-term memory layer with the mixer call signature (Titans "LMM")."""

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs):
        self.config = config
        params = init_params(rngs.params(), config)
        # one Param per array, so optimisers and sharding see plain arrays
        self._names = tuple(sorted(k for k in params if k != "memory"))
        for name in self._names:
            setattr(self, name, nnx.Param(params[name]))
        self.memory = nnx.List([nnx.Param(w) for w in params["memory"]])

    def params(self) -> dict:
        """The functional parameter dict of :func:`memory_layer`."""
        params = {name: getattr(self, name)[...] for name in self._names}
        params["memory"] = tuple(w[...] for w in self.memory)
        return params

    def __call__(self, x: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        del positions, segment_ids  # see module docstring
        params = self.params()
        state = fresh_state(params, self.config, x.shape[0])
        return memory_layer(params, state, x, config=self.config)[0]
