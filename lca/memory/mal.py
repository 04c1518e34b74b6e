"""Titans MAL, memory as a layer (paper Sec. 4.3): the neural memory, then sliding-window attention.

For ``x [b, l, d_model]`` with persistent tokens ``P``:

    y = LMM([P || x])        the neural memory (:mod:`lca.memory.neural_memory`), from its fresh state
    out = SW-Attn*(y)        sliding-window causal attention over the memory's output

``*`` is MAG's attention branch (:mod:`lca.memory.mag`): every query also sees ``P``,
merged in by log-sum-exp, so the window applies to the sequence only. Departure from
the paper, and why: the paper attends over ``M([P || x])`` including the memory's
outputs at the persistent positions, which a window would drop for late queries; we
keep ``P`` itself as a prefix visible to every query, as in MAG. The parameters are
MAG's without the gate gains.
"""

from __future__ import annotations

import dataclasses

import jax

from lca.memory import neural_memory as nm
from lca.memory.context_parallel import ContextSplit, fresh_memory
from lca.memory.mag import (MagConfig, MagMixer, TitansCache, TitansMagConfig, attention_branch,
                            attention_branch_cached)
from lca.memory.mag import init_params as mag_init_params
from lca.memory.mag import param_axes as mag_param_axes


@dataclasses.dataclass(frozen=True)
class TitansMalConfig(TitansMagConfig):
    """``model.mixers.titans_mal``: the memory's fields, and the window of the attention after it."""


def init_params(key: jax.Array, config: MagConfig) -> dict:
    params = mag_init_params(key, config)
    del params["gain_attn"], params["gain_memory"]
    return params


def param_axes(config: MagConfig) -> dict:
    axes = mag_param_axes(config)
    del axes["gain_attn"], axes["gain_memory"]
    return axes


def mal_layer(
    params: dict, x: jax.Array, positions: jax.Array, segment_ids=None, *, config: MagConfig,
    split: ContextSplit | None = None,
) -> jax.Array:
    """One MAL layer on a whole sequence ``x [b, l, d_model]`` -> ``[b, l, d_model]``.

    ``split``: run the memory pipelined over a mesh axis (the same result).
    """
    y = fresh_memory(params["memory"], x, config=config.memory, split=split, segment_ids=segment_ids)
    return attention_branch(params, y, positions, segment_ids, config)


def mal_extend(params: dict, x: jax.Array, positions: jax.Array, cache: TitansCache, *, config: MagConfig):
    """:func:`mal_layer` of the next ``t`` tokens ``x [b, t, d_model]`` after those in ``cache``:
    ``(out [b, t, d_model], cache)``; streaming a sequence so equals one call over all of it."""
    y, memory = nm.memory_layer(params["memory"], cache.memory, x, config=config.memory)
    out, attention_cache = attention_branch_cached(params, y, positions, cache.attention, config)
    return out, TitansCache(memory, attention_cache)


class MalMixer(MagMixer):
    """MAL with the mixer call signature ``mixer(x, positions, segment_ids)`` (MAG's, with MAL's layer)."""

    init_params = staticmethod(init_params)
    param_axes = staticmethod(param_axes)
    layer = staticmethod(mal_layer)
    layer_extend = staticmethod(mal_extend)
