"""Token mixers: the catalogue of what a decoder layer may use to mix tokens.

A decoder block is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. ``model.pattern``
names a mixer kind per layer (cycled over the layers), e.g. ``[local, local, local,
global]``. A mixer is an ``nnx.Module`` that may own parameters and state, built as

    MIXERS[kind].module(section, env, rngs=rngs)

from its typed config section ``section = model.mixers.<kind>`` (an instance of
``MIXERS[kind].config``) and the :class:`MixerEnv` every mixer shares, and called as

    mixer(x [b, l, d_model], positions [b, l], segment_ids [b, l]) -> [b, l, d_model]

To add a mixer kind: write its module and its config dataclass (a frozen dataclass;
an optional ``check(self, key, model)`` raises ``lca.config.ConfigError`` for bad
values; an optional ``check_run(self, key, cfg)`` checks it against the whole run config,
e.g. the data; an optional ``sequence_multiple(self, key, model, mesh)`` returns the length
multiple its layers need on a mesh, or raises a ConfigError where they cannot run there;
an optional ``attends(self, model)`` returns what its attention spans,
:class:`lca.models.attends.Attends`, for the analytic FLOP count of :mod:`lca.train.flops`),
and add one entry to :data:`MIXERS`. The config then accepts
``model.mixers.<kind>.*`` (typed, unknown keys rejected at load) and
``model.pattern`` may name it.

Inference over a cache (:func:`lca.models.generate.generate`) is optional: a mixer that
supports it has ``start_cache(batch, max_len, dtype) -> cache`` (a pytree) and
``extend(x [b, t, d_model], positions [b, t], cache) -> (out [b, t, d_model], cache)``,
which processes the ``t`` tokens that follow those already in the cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from lca.config import ConfigError, ModelConfig, choice_error
from lca.memory.mac import MacMixer, TitansMacConfig
from lca.memory.mag import MagMixer, TitansMagConfig
from lca.memory.mal import MalMixer, TitansMalConfig
from lca.memory.mixer import MemoryMixer, TitansLmmConfig
from lca.models import strategies
from lca.models.gqa import Attention, GlobalAttentionConfig, LocalAttentionConfig
from lca.models.landmark import LandmarkAttention, LandmarkConfig
from lca.parallel.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class MixerEnv:
    """What every mixer may use besides its own section."""

    model: ModelConfig  # sizes, dtypes, rope_theta, num_layers
    # The model's attention (model.attention: local implementation x sequence strategy):
    # attend(q, k, v, *, causal, segment_ids, window, softcap, scale) -> out, global arrays.
    attend: Callable
    mesh: jax.sharding.Mesh | None
    shard: Sharder  # constrains activations to the mesh layout by logical axis names

    def sequence_axis(self) -> str | None:
        """The mesh axis the model's sequence strategy splits the sequence over; None if not split.

        A recurrent mixer (Titans memory) passes its state along this axis.
        """
        return strategies.split_axis(self.model, self.mesh)


@dataclasses.dataclass(frozen=True)
class Mixer:
    config: type  # its typed section, model.mixers.<kind>
    module: Callable  # (section, env, *, rngs) -> nnx.Module


MIXERS: dict[str, Mixer] = {
    "global": Mixer(GlobalAttentionConfig, Attention),
    "local": Mixer(LocalAttentionConfig, Attention),
    "landmark": Mixer(LandmarkConfig, LandmarkAttention),
    "titans_lmm": Mixer(TitansLmmConfig, MemoryMixer),  # Titans neural memory alone
    "titans_mag": Mixer(TitansMagConfig, MagMixer),  # memory gating sliding-window attention
    "titans_mal": Mixer(TitansMalConfig, MalMixer),  # memory, then sliding-window attention
    "titans_mac": Mixer(TitansMacConfig, MacMixer),  # segment attention over retrieved memory
}


def layer_mixers(model: ModelConfig) -> list[str]:
    """Each layer's mixer kind: ``model.pattern`` cycled over ``model.num_layers``."""
    return [model.pattern[i % len(model.pattern)] for i in range(model.num_layers)]


def make_mixer(kind: str, env: MixerEnv, *, rngs):
    return MIXERS[kind].module(env.model.mixers[kind], env, rngs=rngs)


def check(model: ModelConfig, run=None) -> None:
    """Load-time checks: ``model.pattern`` names known kinds; the sections it uses are valid (and fit ``run``)."""
    if not model.pattern:
        raise ConfigError(f"config key 'model.pattern' must be a non-empty list of mixer kinds from {list(MIXERS)}.")
    for kind in model.pattern:
        if kind not in MIXERS:
            raise choice_error("model.pattern", kind, list(MIXERS))
    for kind in dict.fromkeys(model.pattern):
        section = model.mixers[kind]
        if hasattr(section, "check"):
            section.check(f"model.mixers.{kind}", model)
        if run is not None and hasattr(section, "check_run"):
            section.check_run(f"model.mixers.{kind}", run)


def sequence_multiple(model: ModelConfig, mesh: jax.sharding.Mesh) -> int:
    """The length multiple the layers of ``model.pattern`` need of their own on ``mesh`` (1: none)."""
    multiple = 1
    for kind in dict.fromkeys(model.pattern):
        section = model.mixers[kind]
        if hasattr(section, "sequence_multiple"):
            multiple = math.lcm(multiple, section.sequence_multiple(f"model.mixers.{kind}", model, mesh))
    return multiple
