"""Titans neural long-term memory (Behrouz, Zhong & Mirrokni, 2025): test-time learning in JAX.

- :mod:`lca.memory.mlp`: the memory model M (an MLP) and its closed-form per-token gradients.
- :mod:`lca.memory.update`: the chunk-parallel update (momentum + forgetting, associative scan).
- :mod:`lca.memory.sequential`: the token-by-token oracle of the same update.
- :mod:`lca.memory.neural_memory`: the functional layer ``memory_layer(params, state, x, restarts=...)``
  (``restarts``: packed documents, :func:`document_starts` of the segment ids).
- :mod:`lca.memory.mixer`: the LMM token mixer (``nnx.Module``, mixer kind ``titans_lmm``).
- :mod:`lca.memory.mag`: MAG, sliding-window attention gated by the memory (functional + mixer ``titans_mag``).
- :mod:`lca.memory.mal`: MAL, the memory then sliding-window attention (functional + mixer ``titans_mal``).
- :mod:`lca.memory.context_parallel`: the exact pipelined memory over a context-sharded mesh.
"""

# The model's mixer catalogue (lca.models.mixers) lists the Titans mixers of this package,
# and MAG uses lca.models.rope: load lca.models first, so that either package may be
# imported first without a circular import.
import lca.models  # noqa: F401  (isort: skip)
from lca.memory.neural_memory import (
    MemoryConfig,
    MemoryState,
    document_starts,
    fresh_state,
    init_params,
    init_state,
    memory_layer,
    retrieve,
)
from lca.memory.update import MemoryTokens, memorize_chunked

__all__ = [
    "MemoryConfig",
    "MemoryState",
    "MemoryTokens",
    "document_starts",
    "fresh_state",
    "init_params",
    "init_state",
    "memorize_chunked",
    "memory_layer",
    "retrieve",
]
